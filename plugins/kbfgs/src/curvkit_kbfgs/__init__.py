"""curvkit-kbfgs: K-BFGS and K-BFGS(L) (Goldfarb, Ren & Bahamou, NeurIPS 2020) as a curvkit plugin.

Installing this package registers, through the ``curvkit.plugins`` entry point,

* the estimator ``"kbfgs"`` (:class:`KBFGSEstimator`): quasi-Newton inverse Kronecker factors
  :math:`H_g` (pre-activations) and :math:`H_a` (inputs) of ``nn.Linear`` layers, to be composed
  with the core ``identity`` inverter and ``kronecker_mode`` preconditioner, and
* the methods ``"KBFGS"`` (:func:`KBFGS`) and ``"KBFGS_L"`` (:func:`KBFGSL`) with the paper's
  MNIST settings,

so ``curvkit.compose(params, estimator="kbfgs", inverter="identity", model=model)`` works without
importing this package.
"""

from . import bfgs
from .estimator import KBFGSConfig, KBFGSEstimator, damped_inverse
from .layers import FALLBACK_KIND
from .preset import KBFGS, KBFGSL

__version__ = "0.1.0"

__all__ = ["FALLBACK_KIND", "KBFGS", "KBFGSConfig", "KBFGSEstimator", "KBFGSL", "bfgs", "damped_inverse"]
