r"""The ``KBFGS`` and ``KBFGS_L`` presets: ``kbfgs`` + core ``kronecker_mode`` + core ``identity``.

Defaults are the paper's MNIST autoencoder settings as the authors' code runs them: learning rate
0.3, :math:`\lambda = 0.3` (:math:`\sqrt\lambda` damps :math:`A` and is :math:`\mu_2` of the double
damping), :math:`\mu_1 = 0.2`, EMA 0.9 for :math:`A` and for the pairs, and a momentum buffer that
is an exponential *average* of the gradients, :math:`M \leftarrow 0.9 M + 0.1 g` from zero
(``dampening=0.9``; curvkit's default undampened buffer is exactly 10 times larger, so
``dampening=0`` with ``lr=0.03`` takes the same steps). K-BFGS(L) keeps 100 pairs. The authors
also add an L2 term :math:`10^{-5} \lVert W \rVert^2` to the loss; curvkit's ``weight_decay`` is
decoupled instead, and 0 by default.

Training loop (a closure re-evaluates the same batch after the update)::

    opt = curvkit_kbfgs.KBFGS(model)
    for x, y in loader:
        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)            # or: forward, zero_grad, backward, then opt.step(closure)
"""

from __future__ import annotations

from typing import Any, Iterable

from torch import nn

from curvkit import CurvatureOptimizer, compose, register

__all__ = ["KBFGS", "KBFGSL"]


def _build(
    who: str,
    model_or_params: nn.Module | Iterable[Any],
    model: nn.Module | None,
    estimator_options: dict[str, Any],
    **options: Any,
) -> CurvatureOptimizer:
    if isinstance(model_or_params, nn.Module):
        if model is not None and model is not model_or_params:
            raise ValueError(
                f"{who} got a model as its first argument and a different model=; pass the model once "
                f"({who}(model)) or parameters with model= ({who}(model.parameters(), model=model))"
            )
        model = model_or_params
        params: Iterable[Any] = list(model.parameters())
    else:
        if model is None:
            raise ValueError(
                f"{who} needs the model to record layer inputs, outputs and output gradients: pass "
                f"{who}(model) or {who}(params, model=model)"
            )
        params = model_or_params
    return compose(
        params,
        estimator="kbfgs",
        preconditioner="kronecker_mode",
        inverter="identity",
        estimator_options=estimator_options,
        model=model,
        **options,
    )


@register("method", "KBFGS")
def KBFGS(
    model_or_params: nn.Module | Iterable[Any],
    *,
    model: nn.Module | None = None,
    lr: float = 0.3,
    damping: float = 0.3,
    momentum: float = 0.9,
    dampening: float = 0.9,
    weight_decay: float = 0.0,
    stat_decay: float = 0.9,
    pair_decay: float = 0.9,
    powell: float = 0.2,
    lm: str = "interpolate",
    skip_tol: float = 1e-4,
    unsupported: str = "fallback",
    memory: int | None = None,
    curvature_every: int = 1,
    invert_every: int = 20,
    max_factor_dim: int | None = 4096,
    **options: Any,
) -> CurvatureOptimizer:
    r"""K-BFGS (Goldfarb, Ren & Bahamou, NeurIPS 2020): dense BFGS :math:`H_g` and :math:`H_a` per
    Linear layer, direction :math:`H_g M H_a` (module docstring for the defaults and the loop).

    Args:
        model_or_params: the model itself (all its parameters are optimised), or parameters /
            param groups together with ``model=``.
        model: the model whose Linear layers are watched (required unless it is the first argument).
        lr, damping, momentum, dampening, weight_decay: options of
            :class:`curvkit.CurvatureOptimizer` (``damping`` is :math:`\lambda`).
        memory: ``None`` keeps :math:`H_g` as a dense matrix (K-BFGS); an integer keeps the last
            ``memory`` pairs as an L-BFGS operator (K-BFGS(L), :func:`KBFGSL`).
        curvature_every, invert_every, max_factor_dim: options of
            :class:`curvkit.CurvatureOptimizer`. ``curvature_every`` schedules the ``A``
            statistics. The direction uses the current :math:`H_g, H_a` at every step (they are
            the inverses, kept up to date by the BFGS updates; nothing is inverted but
            :math:`A + \sqrt\lambda I`, once), so ``invert_every`` sets only the period of the
            state check: one host read that restarts non-finite statistics or momentum and reads
            the health counters (:meth:`curvkit.CurvatureOptimizer.health`). Every step in
            between reads nothing on the host (faults there are masked and counted on the device).
        stat_decay, pair_decay, powell, lm, skip_tol, unsupported: options of
            :class:`curvkit_kbfgs.KBFGSEstimator` (see :class:`curvkit_kbfgs.KBFGSConfig`).
        options: any other option of :class:`curvkit.CurvatureOptimizer` (``nonfinite``,
            ``seed``, ``strict``, ...).
    """
    return _build(
        "KBFGS" if memory is None else "KBFGS_L", model_or_params, model,
        dict(stat_decay=stat_decay, pair_decay=pair_decay, powell=powell, lm=lm, memory=memory,
             skip_tol=skip_tol, unsupported=unsupported),
        lr=lr, damping=damping, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
        curvature_every=curvature_every, invert_every=invert_every, max_factor_dim=max_factor_dim,
        **options,
    )


@register("method", "KBFGS_L")
def KBFGSL(model_or_params: nn.Module | Iterable[Any], *, memory: int = 100, **options: Any) -> CurvatureOptimizer:
    r"""K-BFGS(L): as :func:`KBFGS` with :math:`H_g` the L-BFGS operator of the last ``memory``
    pairs (100 in the paper), applied by the two-loop recursion (never a dense matrix).

    Args:
        memory: the number of pairs kept per layer.
        options: as in :func:`KBFGS` (same defaults).
    """
    return KBFGS(model_or_params, memory=memory, **options)
