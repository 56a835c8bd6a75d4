r"""curvkit-shampoo: Shampoo as a curvkit plugin.

Importing the package (which curvkit does through the ``curvkit.plugins`` entry point at the
first registry lookup) registers:

==================  =====================  ==========================================================
kind                name                   what
==================  =====================  ==========================================================
estimator           ``shampoo``            mode Gram matrices of the minibatch gradient, EMA or sum,
                                           optional tiling of large parameters (``block_size``)
inverter            ``coupled_newton``     :math:`(A + \epsilon I)^{-1/p}` by the coupled Newton
                                           iteration, :math:`p` fixed or :math:`2k`
preconditioner      ``grafted_kronecker``  Kronecker mode products (per tile for tiled blocks) with
                                           the norm of an Adam, AdaGrad or SGD direction, and a
                                           start step
method              ``Shampoo``            the preset (:func:`Shampoo`)
==================  =====================  ==========================================================

Everything else (views, Kronecker mode products, ``damped_eigen`` roots, the optimizer) is
curvkit's own.
"""

from .blocking import TiledLayout, kronecker_direction, tile_grams, tile_products, tile_sizes, tiled_block
from .coupled_newton import CoupledNewton, CoupledNewtonConfig, lambda_max
from .estimator import ShampooStatistics, ShampooStatisticsConfig
from .grafting import GraftedKronecker, GraftedKroneckerConfig
from .preset import Shampoo

__version__ = "0.1.0"

__all__ = [
    "CoupledNewton",
    "CoupledNewtonConfig",
    "GraftedKronecker",
    "GraftedKroneckerConfig",
    "Shampoo",
    "ShampooStatistics",
    "ShampooStatisticsConfig",
    "TiledLayout",
    "kronecker_direction",
    "lambda_max",
    "tile_grams",
    "tile_products",
    "tile_sizes",
    "tiled_block",
]
