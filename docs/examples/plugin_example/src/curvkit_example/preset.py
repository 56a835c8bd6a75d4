r"""The ``DiagonalShampoo`` preset: ``mode_diagonal`` + ``diagonal_power`` + ``kronecker_mode``.

With :math:`k` modes and the default root :math:`p = 1/(2k)`, the direction of a matrix block
(:math:`k = 2`) is

.. math:: P_{ab} = \frac{M_{ab}}{(r_1[a] + \epsilon)^{1/4}\,(r_2[b] + \epsilon)^{1/4}},

Shampoo with its factors restricted to their diagonals.
"""

from __future__ import annotations

from typing import Any, Iterable

from curvkit import CurvatureOptimizer, compose

__all__ = ["DiagonalShampoo"]


def DiagonalShampoo(
    params: Iterable[Any],
    *,
    lr: float = 1e-3,
    damping: float = 1e-4,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    stat_decay: float = 0.9,
    power: float | str = "1/2k",
    curvature_every: int = 1,
    invert_every: int = 1,
    **options: Any,
) -> CurvatureOptimizer:
    """Diagonal Shampoo: per-mode diagonal statistics of the minibatch gradient, inverted as roots.

    Inverses are cheap (:math:`O(d)`), so they are refreshed every step by default.
    ``options`` are further :class:`curvkit.CurvatureOptimizer` options (``seed``, ``model``, ...).
    """
    return compose(
        params,
        estimator="mode_diagonal",
        estimator_options={"stat_decay": stat_decay, "evidence": "empirical"},
        inverter="diagonal_power",
        inverter_options={"power": power},
        preconditioner="kronecker_mode",
        lr=lr,
        damping=damping,
        momentum=momentum,
        weight_decay=weight_decay,
        curvature_every=curvature_every,
        invert_every=invert_every,
        **options,
    )
