"""Built-in curvature estimators: ``tensor_normal`` (TNT, with its KL option) and ``none``."""

from .none import NoCurvature, NoCurvatureConfig
from .tensor_normal import TensorNormal, TensorNormalConfig

__all__ = ["NoCurvature", "NoCurvatureConfig", "TensorNormal", "TensorNormalConfig"]
