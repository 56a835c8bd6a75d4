"""curvkit-example: a small, complete curvkit plugin.

It adds diagonal Shampoo, a method built from two new parts and one core part:

* the estimator ``"mode_diagonal"`` (:class:`ModeDiagonal`): the diagonals of the mode Gram
  matrices, :math:`O(\\prod_j d_j)` memory-light statistics per block;
* the inverter ``"diagonal_power"`` (:class:`DiagonalPower`): :math:`(\\mathrm{diag}(U) +
  \\epsilon I)^{-p}`, an :math:`O(d)` inverse for diagonal factors;
* the method ``"DiagonalShampoo"`` (:func:`DiagonalShampoo`): the two with the core
  ``kronecker_mode`` preconditioner.

Installing the package declares the entry point ``example = "curvkit_example:register_parts"`` in
the ``curvkit.plugins`` group; the registry calls :func:`register_parts` with itself at its first
lookup, so importing this package has no side effects.
"""

from __future__ import annotations

from curvkit.registry import Registry

from .estimator import ModeDiagonal, ModeDiagonalConfig
from .inverter import DiagonalPower, DiagonalPowerConfig
from .preset import DiagonalShampoo

__version__ = "0.1.0"

__all__ = [
    "DiagonalPower",
    "DiagonalPowerConfig",
    "DiagonalShampoo",
    "ModeDiagonal",
    "ModeDiagonalConfig",
    "register_parts",
]


def register_parts(registry: Registry) -> None:
    """Register this plugin's parts in ``registry`` (the entry point's object)."""
    registry.register("estimator", "mode_diagonal", ModeDiagonal)
    registry.register("inverter", "diagonal_power", DiagonalPower)
    registry.register("method", "DiagonalShampoo", DiagonalShampoo)
