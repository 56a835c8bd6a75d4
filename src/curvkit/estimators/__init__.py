"""Built-in curvature estimators: ``tensor_normal`` (TNT)."""

from .tensor_normal import TensorNormal, TensorNormalConfig

__all__ = ["TensorNormal", "TensorNormalConfig"]
