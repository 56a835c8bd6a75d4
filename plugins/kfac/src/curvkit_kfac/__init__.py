"""curvkit-kfac: the KFAC curvature method as a curvkit plugin.

Installing this package registers, through the ``curvkit.plugins`` entry point,

* the estimator ``"kfac"`` (:class:`KFACEstimator`): Kronecker factors of layer inputs and
  output gradients of ``nn.Linear`` and ``nn.Conv2d`` layers, and
* the method ``"KFAC"`` (:func:`KFAC`): ``kfac`` + the core ``kronecker_mode`` preconditioner +
  a power-1 damped inverter, with the TNT paper's MNIST settings,
* EKFAC (George et al., 2018; :mod:`curvkit_kfac.ekfac`): the estimator ``"ekfac"``, the
  preconditioner ``"eigen_corrected"`` and the method ``"EKFAC"``,

so ``curvkit.compose(params, estimator="kfac", model=model)`` works without importing this
package.
"""

from . import planning
from .ekfac import EKFAC, EigenCorrected, EKFACConfig, EKFACEstimator
from .estimator import FALLBACK_KIND, KFACConfig, KFACEstimator
from .layers import conv2d_patches, layer_rows
from .preset import KFAC

__version__ = "0.1.0"

__all__ = ["EKFAC", "EKFACConfig", "EKFACEstimator", "EigenCorrected", "FALLBACK_KIND", "KFAC", "KFACConfig", "KFACEstimator", "conv2d_patches", "layer_rows", "planning"]
