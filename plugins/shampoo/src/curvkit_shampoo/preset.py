r"""The ``Shampoo`` preset: ``shampoo`` statistics, inverse roots, Kronecker mode products."""

from __future__ import annotations

from typing import Any, Iterable

from torch import nn

import curvkit
from curvkit import CurvatureOptimizer
from curvkit.config import check_choice

__all__ = ["Shampoo"]


@curvkit.register("method", "Shampoo")
def Shampoo(
    params: Iterable[Any],
    *,
    lr: float = 3e-4,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    damping: float = 3e-4,
    stat_decay: float = 0.9,
    accumulate: str = "ema",
    curvature_every: int = 1,
    invert_every: int = 20,
    root_solver: str = "coupled_newton",
    relative_damping: bool = False,
    graft: str = "none",
    start_step: int = 0,
    beta2: float = 0.999,
    graft_epsilon: float = 1e-8,
    block_size: int | None = None,
    max_factor_dim: int | None = 4096,
    tolerance: float = 1e-10,
    max_iterations: int = 100,
    model: nn.Module | None = None,
    nonfinite: str = "skip",
    seed: int | None = None,
) -> CurvatureOptimizer:
    r"""Shampoo (Gupta, Koren & Singer, ICML 2018) as the TNT authors compared it, plus the options
    of production Shampoo.

    Per block (default views as TNT: ``(out, in)``, conv ``(out, in, kh*kw)``, vectors one mode),
    with :math:`G` the minibatch gradient and :math:`M \leftarrow \mu M + G` the momentum buffer:

    .. math::
        S_i \leftarrow \beta S_i + (1 - \beta)\, G_{(i)} G_{(i)}^\top, \qquad
        V_i = (S_i + \epsilon I)^{-1/(2k)}, \qquad
        W \leftarrow W (1 - \eta\, \mathrm{wd}) - \eta\, M \times_1 V_1 \cdots \times_k V_k .

    Defaults are the TNT authors' MNIST settings: ``lr=3e-4``, :math:`\epsilon` = ``damping=3e-4``,
    statistics every step with EMA 0.9, roots every 20 steps, momentum 0.9, no grafting.

    Args:
        params: parameters or param groups.
        lr, momentum, weight_decay: as :class:`curvkit.CurvatureOptimizer` (decoupled decay).
        damping: :math:`\epsilon` added to each statistic before the root.
        stat_decay: :math:`\beta` of the EMA.
        accumulate: ``"ema"`` or ``"sum"`` (AdaGrad-style running sum, the Shampoo paper's).
        curvature_every: steps between statistics updates.
        invert_every: steps between root computations (plus every statistics step while
            the step index is below it).
        root_solver: ``"coupled_newton"`` (the authors' solver) or ``"eigen"``
            (``damped_eigen(power="1/2k")``); both give the same matrix.
        relative_damping: :math:`\epsilon` relative to each statistic's largest eigenvalue.
        graft: ``"none"``, ``"sgd"``, ``"adam"`` or ``"adagrad"``: take each block's step norm from
            that first-order direction (see :class:`curvkit_shampoo.GraftedKronecker`).
        start_step: steps that use the graft direction alone before Shampoo's starts.
        beta2, graft_epsilon: the Adam / AdaGrad graft's :math:`\beta_2` and :math:`\delta`.
        block_size: tile parameters whose view has a mode larger than this into tiles of at most
            ``block_size`` per mode, each with its own statistics and roots of the view's order
            (see :mod:`curvkit_shampoo.blocking`); ``None`` keeps whole parameters. Tiled
            blocks use the ``grafted_kronecker`` preconditioner (with ``graft="none"``: the plain
            direction, per tile).
        max_factor_dim: modes (of a tile, when tiled) larger than this get no factor (identity).
        tolerance, max_iterations: stopping rule of the coupled Newton iteration.
        model: the model (only used to name the blocks).
        nonfinite, seed: as :class:`curvkit.CurvatureOptimizer`.
    """
    check_choice("root_solver", root_solver, ("coupled_newton", "eigen"))
    if root_solver == "coupled_newton":
        inverter = "coupled_newton"
        inverter_options: dict[str, Any] = {
            "power": "1/2k", "relative_damping": relative_damping,
            "tolerance": tolerance, "max_iterations": max_iterations,
        }
    else:
        inverter, inverter_options = "damped_eigen", {"power": "1/2k", "relative_damping": relative_damping}
    if graft == "none" and start_step == 0 and block_size is None:
        preconditioner, preconditioner_options = "kronecker_mode", {}
    else:
        preconditioner = "grafted_kronecker"
        preconditioner_options = {
            "graft": graft, "start_step": start_step, "beta2": beta2, "graft_epsilon": graft_epsilon,
        }
    return curvkit.compose(
        params,
        estimator="shampoo",
        preconditioner=preconditioner,
        inverter=inverter,
        estimator_options={"stat_decay": stat_decay, "accumulate": accumulate, "block_size": block_size},
        preconditioner_options=preconditioner_options,
        inverter_options=inverter_options,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        damping=damping,
        curvature_every=curvature_every,
        invert_every=invert_every,
        max_factor_dim=max_factor_dim,
        model=model,
        nonfinite=nonfinite,
        seed=seed,
    )
