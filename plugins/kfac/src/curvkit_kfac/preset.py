r"""The ``KFAC`` preset: ``kfac`` + ``kronecker_mode`` + a power-1 damped inverter.

A preset is a composition: the plugin adds only the estimator, and reuses the core's Kronecker
mode preconditioner and damped inverters, which form the direction
:math:`(G + \sqrt\lambda I)^{-1} M (A + \sqrt\lambda I)^{-1}` on the momentum buffer :math:`M`.
"""

from __future__ import annotations

from typing import Any, Iterable

from torch import nn

from curvkit import CurvatureOptimizer, compose, register
from curvkit.config import check_choice

__all__ = ["KFAC"]

_INVERTERS = {"damped_eigen": {"power": 1.0}, "cholesky": {}}


@register("method", "KFAC")
def KFAC(
    model_or_params: nn.Module | Iterable[Any],
    *,
    model: nn.Module | None = None,
    lr: float = 3e-3,
    damping: float = 0.3,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    stat_decay: float = 0.9,
    curvature_every: int = 1,
    invert_every: int = 20,
    evidence: str = "sampled",
    pi_damping: bool = False,
    fallback: str = "momentum",
    gradient_scale: float | None = None,
    inverter: str = "damped_eigen",
    max_factor_dim: int | None = 4096,
    **options: Any,
) -> CurvatureOptimizer:
    r"""KFAC (Martens & Grosse, 2015) with the settings of the TNT paper's MNIST comparison.

    Defaults: ``lr=3e-3``, damping :math:`\lambda = 0.3` (:math:`\sqrt\lambda` added to each
    factor), EMA 0.9, momentum 0.9, statistics every step (``curvature_every=1``) and inverses
    every 20 steps (``invert_every=20``), true-Fisher (sampled-target) evidence. The training
    loop is the same as for every curvkit method::

        opt = curvkit_kfac.KFAC(model)
        out = model(x)
        opt.zero_grad()
        opt.update_curvature(out, loss="cross_entropy")
        loss_fn(out, y).backward()
        opt.step()

    Args:
        model_or_params: the model itself (its parameters are optimised), or parameters /
            param groups together with ``model=``.
        model: the model whose Linear and Conv2d layers are watched (required when the first
            argument is not the model).
        lr: learning rate.
        damping: :math:`\lambda`; each Kronecker factor gets :math:`\sqrt\lambda`.
        momentum: momentum of the buffer the direction is formed from.
        weight_decay: decoupled weight decay.
        stat_decay: EMA decay of ``A`` and ``G``.
        curvature_every: :math:`T_1`, steps between statistics updates.
        invert_every: :math:`T_2`, steps between inversions.
        evidence: ``"sampled"`` (true Fisher) or ``"empirical"``.
        pi_damping: split the damping between the factors by the trace ratio :math:`\pi`.
        fallback: ``"momentum"`` or ``"error"`` for parameters of layers kfac does not know.
        gradient_scale: per-example rescaling of output gradients (``None``: the batch size).
        max_factor_dim: modes larger than this stay unfactored (identity).
        options: any other option of :class:`curvkit.CurvatureOptimizer` (``nonfinite``,
            ``seed``, ``loss``, ``strict``, ``distributed``, ...).
        inverter: ``"damped_eigen"`` (power 1, robust to PSD rounding) or ``"cholesky"``
            (cheaper).
    """
    if isinstance(model_or_params, nn.Module):
        if model is not None and model is not model_or_params:
            raise ValueError(
                "KFAC got a model as its first argument and a different model=; pass the model once "
                "(KFAC(model)) or parameters with model= (KFAC(model.parameters(), model=model))"
            )
        model = model_or_params
        params: Iterable[Any] = list(model.parameters())
    else:
        if model is None:
            raise ValueError(
                "KFAC needs the model to record layer inputs and output gradients: pass KFAC(model) or "
                "KFAC(params, model=model)"
            )
        params = model_or_params
    check_choice("inverter", inverter, tuple(_INVERTERS))
    return compose(
        params,
        estimator="kfac",
        preconditioner="kronecker_mode",
        inverter=inverter,
        estimator_options={
            "stat_decay": stat_decay,
            "evidence": evidence,
            "pi_damping": pi_damping,
            "fallback": fallback,
            "gradient_scale": gradient_scale,
        },
        inverter_options=_INVERTERS[inverter],
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        damping=damping,
        curvature_every=curvature_every,
        invert_every=invert_every,
        max_factor_dim=max_factor_dim,
        model=model,
        **options,
    )
