r"""Building optimizers from registered parts: :func:`compose` and the :func:`TNT` preset.

A preset is a composition, not a subclass: ``TNT`` is ``tensor_normal`` + ``kronecker_mode`` +
``damped_eigen`` with the paper's defaults.
"""

from __future__ import annotations

import inspect

from typing import Any, Iterable, Mapping

from torch import nn

from .interfaces import CurvatureEstimator, Inverter, Part, Preconditioner
from .optimizer import CurvatureOptimizer
from .registry import register, registry

__all__ = ["TNT", "build_part", "compose"]


def build_part(kind: str, spec: str | Part, options: Mapping[str, Any] | None = None) -> Part:
    """A part from a registered name (plus options) or a ready part instance."""
    base = {"estimator": CurvatureEstimator, "preconditioner": Preconditioner, "inverter": Inverter}[kind]
    if isinstance(spec, Part):
        if options:
            raise ValueError(f"{kind}_options can only be given with a registered name, not a built {kind}")
        if not isinstance(spec, base):
            raise ValueError(f"{kind} must be a {base.__name__}, got {type(spec).__name__}")
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"{kind} must be a registered name or a {base.__name__}, got {spec!r}")
    cls = registry.get(kind, spec)
    part = cls(**dict(options or {}))
    if not isinstance(part, base):
        raise ValueError(f"registered {kind} {spec!r} is a {type(part).__name__}, not a {base.__name__}")
    return part


def compose(
    params: Iterable[Any],
    *,
    estimator: str | CurvatureEstimator,
    preconditioner: str | Preconditioner = "kronecker_mode",
    inverter: str | Inverter = "damped_eigen",
    estimator_options: Mapping[str, Any] | None = None,
    preconditioner_options: Mapping[str, Any] | None = None,
    inverter_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> CurvatureOptimizer:
    """Build a :class:`CurvatureOptimizer` from parts given by registered name or as instances.

    Example::

        opt = curvkit.compose(model.parameters(), estimator="tensor_normal",
                              inverter="damped_eigen", inverter_options={"power": "1/2k"},
                              lr=1e-4, damping=0.1)

    Args:
        params: parameters or param groups.
        estimator, preconditioner, inverter: registered names (see :func:`curvkit.available`)
            or part instances.
        estimator_options, preconditioner_options, inverter_options: keyword options of each part
            (validated by its config).
        **options: options of :class:`CurvatureOptimizer` (``lr``, ``momentum``, ``damping``, ...).
    """
    known = set(inspect.signature(CurvatureOptimizer.__init__).parameters) - {"self", "params", "estimator", "preconditioner", "inverter"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"unknown optimizer option(s) {unknown}; the options of CurvatureOptimizer are {sorted(known)} "
            f"(part options go in estimator_options=, preconditioner_options=, inverter_options=)"
        )
    est = build_part("estimator", estimator, estimator_options)
    pre = build_part("preconditioner", preconditioner, preconditioner_options)
    inv = build_part("inverter", inverter, inverter_options)
    produces = "operator" if est.factors_are_inverses else inv.produces
    if produces not in pre.accepts:
        raise ValueError(
            f"preconditioner {pre.name!r} accepts per-mode entries of kind {list(pre.accepts)}, but "
            f"{'estimator ' + repr(est.name) if est.factors_are_inverses else 'inverter ' + repr(inv.name)} "
            f"produces {produces!r}: choose parts that fit together"
        )
    if pre.reads_statistics:
        pre.check_estimator(est)
    return CurvatureOptimizer(params, estimator=est, preconditioner=pre, inverter=inv, **options)


@register("method", "TNT")
def TNT(
    params: Iterable[Any],
    *,
    lr: float = 1e-4,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    damping: float = 0.1,
    stat_decay: float = 0.9,
    curvature_every: int = 1,
    invert_every: int = 20,
    evidence: str = "sampled",
    relative_damping: bool = False,
    max_factor_dim: int | None = 4096,
    model: nn.Module | None = None,
    **options: Any,
) -> CurvatureOptimizer:
    r"""Tensor Normal Training (Ren & Goldfarb, NeurIPS 2021).

    ``tensor_normal`` statistics of the sampled (true-Fisher) gradient with EMA ``stat_decay`` and
    same-trace normalisation, inverted as :math:`(U_i + \epsilon I)^{-1}` by ``damped_eigen``,
    applied to the momentum buffer by ``kronecker_mode``. Defaults are the paper's MNIST
    autoencoder settings (``lr=1e-4``, ``damping=0.1``, ``T1=1``, ``T2=20``); its CNN settings are
    ``curvature_every=10, invert_every=100``. ``evidence="empirical"`` is the paper's ablation
    with the minibatch gradient. ``relative_damping=True`` makes the damping scale-free
    (:math:`\epsilon` times each normalised factor's average eigenvalue), so the step no longer
    grows like :math:`\epsilon^{-k}` with a block's order ``k`` where damping dominates; the
    paper's absolute damping stays the default. ``params`` may be the model itself. Any other option of
    :class:`~curvkit.CurvatureOptimizer` (``nonfinite``, ``seed``, ``sync_statistics``,
    ``dampening``, ``loss``, ``strict``, ...) passes through.
    """
    return compose(
        params,
        estimator="tensor_normal",
        preconditioner="kronecker_mode",
        inverter="damped_eigen",
        estimator_options={"stat_decay": stat_decay, "evidence": evidence, "relative_damping": relative_damping},
        inverter_options={"power": 1.0},
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
