r"""Methods beyond the TNT paper, each a composition of registered parts.

==============  =========================================  ============================  =====================================
method          estimator                                  inverter                      preconditioner
==============  =========================================  ============================  =====================================
``SOAP``        ``tensor_normal`` (minibatch Grams)        ``eigenbasis``                ``adam_eigenbasis``
``KL_Shampoo``  ``tensor_normal`` (minibatch, KL)          ``damped_eigen`` (power 1/2)  ``kronecker_mode``
``TNT_KL``      ``tensor_normal`` (sampled, KL)            ``damped_eigen`` (power 1)    ``kronecker_mode``
``Muon``        ``none``                                   ``identity``                  ``partition``: ``muon`` + ``adamw``
==============  =========================================  ============================  =====================================

Every preset takes ``route_unmodelled``: ``"adamw"`` wraps its preconditioner in a
``partition`` that sends the blocks it does not model (and blocks named by ``unmodelled``
patterns) to ``adamw``; ``None`` keeps the method's own handling. See :doc:`/concepts/beyond`.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Iterable, Mapping, Sequence

from torch import nn

from .blocks import view_shape_for

from .config import check_choice, check_in_unit_interval, check_positive
from .methods import compose
from .optimizer import CurvatureOptimizer
from .registry import register

__all__ = ["KL_Shampoo", "Muon", "SOAP", "TNT_KL", "routed"]


def _embedding_names(model: nn.Module | None) -> tuple[str, ...]:
    if model is None:
        return ()
    names = []
    for mname, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            names += [f"{mname}.{pname}" if mname else pname for pname, _ in module.named_parameters(recurse=False)]
    return tuple(names)


def _split_for_adamw(
    params: Iterable[Any], model: nn.Module | None, patterns: Sequence[str], adamw_lr: float
) -> list[dict[str, Any]]:
    """Two param groups: the matrices Muon models, and the rest with ``lr=adamw_lr`` (so that
    the rest also gets AdamW's decoupled weight decay :math:`\\eta_{adamw}\\lambda`)."""
    items = list(params)
    if any(isinstance(i, dict) for i in items):
        raise ValueError(
            "adamw_lr splits the parameters into two param groups and cannot split param-group dicts: "
            "pass plain parameters, or give the AdamW blocks their lr in your own param groups"
        )
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    muon, rest = [], []
    for item in items:
        name, p = item if isinstance(item, tuple) else (names.get(id(item)), item)
        shape, _ = view_shape_for(p.shape)
        named_out = name is not None and any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
        (muon if len(shape) >= 2 and not named_out else rest).append(item)
    return [g for g in ({"params": muon}, {"params": rest, "lr": adamw_lr}) if g["params"]]


def routed(
    preconditioner: str,
    options: Mapping[str, Any] | None,
    *,
    route_unmodelled: str | None,
    label: str,
    unmodelled: Sequence[str] = (),
    adamw_options: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """``(preconditioner, options)`` for :func:`~curvkit.compose`: the method's own, or with
    ``route_unmodelled="adamw"`` a ``partition`` sending unmodelled blocks (rule ``label``, plus
    the ``unmodelled`` name patterns) to ``adamw``."""
    check_choice("route_unmodelled", route_unmodelled, ("adamw", None))
    if route_unmodelled is None:
        if unmodelled:
            raise ValueError(
                f"unmodelled={tuple(unmodelled)!r} needs route_unmodelled='adamw' (there is nowhere to route them)"
            )
        return preconditioner, dict(options or {})
    return "partition", {
        "label": label,
        "preconditioners": {"modelled": preconditioner, "unmodelled": "adamw"},
        "options": {"modelled": dict(options or {}), "unmodelled": dict(adamw_options or {})},
        "unmodelled": tuple(unmodelled),
    }


def _betas(name: str, betas: Sequence[float]) -> tuple[float, float]:
    if len(tuple(betas)) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {betas!r}")
    b1, b2 = (float(b) for b in betas)
    check_in_unit_interval(f"{name}[0]", b1)
    check_in_unit_interval(f"{name}[1]", b2)
    return b1, b2


@register("method", "SOAP")
def SOAP(
    params: Iterable[Any],
    *,
    lr: float = 3e-3,
    betas: Sequence[float] = (0.95, 0.95),
    shampoo_beta: float | None = None,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    precondition_frequency: int = 10,
    max_precond_dim: int | None = 10000,
    on_refresh: str = "carry",
    basis_refresh: str = "eigh",
    route_unmodelled: str | None = None,
    unmodelled: Sequence[str] = (),
    model: nn.Module | None = None,
    **options: Any,
) -> CurvatureOptimizer:
    r"""SOAP: Shampoo with Adam in the Preconditioner's eigenbasis (Vyas et al., 2024,
    arXiv 2409.11321).

    Per block with view :math:`d_1 \times \cdots \times d_k` and minibatch gradient :math:`G`:

    .. math::
        L_i &\leftarrow \beta_s L_i + (1 - \beta_s)\, G_{(i)} G_{(i)}^\top, \qquad
        Q_i = \mathrm{eigvecs}(L_i) \text{ every } f \text{ steps}, \\
        M &\leftarrow \beta_1 M + (1 - \beta_1) G, \qquad
        V \leftarrow \beta_2 V + (1 - \beta_2)\, (G \times_i Q_i^\top)^{\odot 2}, \\
        W &\leftarrow W (1 - \eta\lambda) - \eta\,\frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}\,
            \frac{M \times_i Q_i^\top}{\sqrt V + \epsilon} \times_i Q_i .

    Parts: ``tensor_normal`` (``evidence="empirical"``, ``normalize=False``, EMA
    :math:`\beta_s`), ``eigenbasis`` (``eigh`` at every refresh, or with
    ``basis_refresh="qr"`` the authors' warm-started QR power step after the first), ``adam_eigenbasis``; the
    optimizer's momentum with ``dampening = momentum = beta1`` is Adam's first moment. Defaults
    are the paper's (``lr=3e-3, betas=(0.95, 0.95)``, :math:`\beta_s = \beta_2`,
    ``precondition_frequency=10``, ``weight_decay=0.01``, ``max_precond_dim=10000``).

    Differences from the authors' code, by construction of the engine: the statistics of step
    :math:`t` enter the basis used at step :math:`t` (the authors update after the step, and skip
    the first step to build the basis); by default the basis is recomputed by ``eigh`` at every
    refresh (``basis_refresh="qr"`` is the authors' one QR power iteration from the previous
    basis); weight decay is applied before the update instead of after it.
    """
    b1, b2 = _betas("betas", betas)
    beta_s = b2 if shampoo_beta is None else shampoo_beta
    check_in_unit_interval("shampoo_beta", beta_s)
    pre, pre_opts = routed(
        "adam_eigenbasis", {"beta1": b1, "beta2": b2, "eps": eps, "on_refresh": on_refresh},
        route_unmodelled=route_unmodelled, label="factored", unmodelled=unmodelled,
        adamw_options={"beta1": b1, "beta2": b2, "eps": eps},
    )
    return compose(
        params,
        estimator="tensor_normal",
        inverter="eigenbasis",
        preconditioner=pre,
        estimator_options={"evidence": "empirical", "normalize": False, "stat_decay": beta_s},
        inverter_options={"refresh": basis_refresh},
        preconditioner_options=pre_opts,
        lr=lr, momentum=b1, dampening=b1, weight_decay=weight_decay, damping=1e-12,
        curvature_every=1, invert_every=precondition_frequency, max_factor_dim=max_precond_dim,
        model=model, **options,
    )


@register("method", "KL_Shampoo")
def KL_Shampoo(
    params: Iterable[Any],
    *,
    lr: float = 3e-3,
    momentum: float = 0.95,
    stat_decay: float = 0.95,
    damping: float = 1e-2,
    kl_damping: float = 0.1,
    relative_damping: bool = True,
    weight_decay: float = 0.01,
    invert_every: int = 10,
    max_factor_dim: int | None = 10000,
    route_unmodelled: str | None = None,
    unmodelled: Sequence[str] = (),
    model: nn.Module | None = None,
    **options: Any,
) -> CurvatureOptimizer:
    r"""KL-Shampoo (Lin et al., 2025, arXiv 2509.03378): Shampoo's factors re-derived as the
    Kullback--Leibler (maximum-likelihood) fit of a Kronecker covariance to the minibatch gradient.

    .. math::
        S_i &\leftarrow \beta S_i + (1 - \beta)\,
            \frac{G_{(i)} \big(\bigotimes_{j \ne i} S_j^{-1}\big) G_{(i)}^\top}{\prod_{j \ne i} d_j}, \\
        W &\leftarrow W (1 - \eta\lambda) - \eta\, M \times_1 (S_1 + \epsilon I)^{-1/2} \cdots
            \times_k (S_k + \epsilon I)^{-1/2},

    with :math:`M \leftarrow \mu M + (1 - \mu) G` and no grafting. Because the factors estimate the
    covariance itself (not its square root, as Shampoo's Grams do), the power per factor is
    :math:`-1/2`. Parts: ``tensor_normal`` (``evidence="empirical"``, ``estimate="kl"``),
    ``damped_eigen`` (``power=0.5``), ``kronecker_mode``. Defaults follow the authors' setting
    shared with SOAP (``lr=3e-3``, :math:`\beta = \mu = 0.95`, refresh every 10 steps,
    ``weight_decay=0.01``); the damping is ours: :math:`\epsilon = 10^{-2}` relative to each
    factor's largest eigenvalue (``relative_damping``), scale-free (an absolute
    :math:`10^{-8}` made the :math:`-1/2` roots of the early, rank-deficient factors diverge on
    digits-ae and on a 4-layer MLP, and an absolute :math:`10^{-3}` diverged when the loss was
    scaled by :math:`10^{15}`); ``kl_damping`` is the relative damping of :math:`S_j^{-1}` inside the
    update (0.1: with one gradient per step the factors are rank-deficient for many steps, and
    1e-3 amplified their null directions on digits-ae); ``relative_damping=False`` makes
    :math:`\epsilon` absolute.
    """
    check_in_unit_interval("momentum", momentum)
    pre, pre_opts = routed("kronecker_mode", None, route_unmodelled=route_unmodelled, label="factored",
                           unmodelled=unmodelled)
    return compose(
        params,
        estimator="tensor_normal",
        inverter="damped_eigen",
        preconditioner=pre,
        estimator_options={"evidence": "empirical", "estimate": "kl", "stat_decay": stat_decay,
                           "kl_damping": kl_damping},
        inverter_options={"power": 0.5, "relative_damping": relative_damping},
        preconditioner_options=pre_opts,
        lr=lr, momentum=momentum, dampening=momentum, weight_decay=weight_decay, damping=damping,
        curvature_every=1, invert_every=invert_every, max_factor_dim=max_factor_dim,
        model=model, **options,
    )


@register("method", "TNT_KL")
def TNT_KL(
    params: Iterable[Any],
    *,
    lr: float = 1e-4,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    damping: float = 0.1,
    stat_decay: float = 0.9,
    kl_damping: float = 0.1,
    curvature_every: int = 1,
    invert_every: int = 20,
    evidence: str = "sampled",
    max_factor_dim: int | None = 4096,
    route_unmodelled: str | None = None,
    unmodelled: Sequence[str] = (),
    model: nn.Module | None = None,
    **options: Any,
) -> CurvatureOptimizer:
    r"""TNT with the maximum-likelihood (KL) estimate of its tensor-normal covariance.

    TNT (Ren & Goldfarb, 2021) models the sampled gradient as
    :math:`\mathrm{vec}(G) \sim \mathcal N(0, U_1 \otimes \cdots \otimes U_k)` but estimates each
    :math:`U_i` by the mode Gram :math:`G_{(i)} G_{(i)}^\top`, which is the maximum-likelihood
    estimate only when the other factors are multiples of the identity. ``TNT_KL`` runs the
    flip-flop (maximum-likelihood, KL-minimising) update on the same sampled evidence,

    .. math:: U_i \leftarrow \beta U_i + (1 - \beta)\,
        \frac{G_{(i)} \big(\bigotimes_{j \ne i} U_j^{-1}\big) G_{(i)}^\top}{\prod_{j \ne i} d_j},

    and keeps everything else of TNT: the inverse :math:`(U_i + \epsilon I)^{-1}`, momentum, the
    ``curvature_every`` / ``invert_every`` schedules (:math:`T_1`, :math:`T_2`), the warm start and
    the paper's defaults. It is ``tensor_normal(estimate="kl")`` + ``damped_eigen(power=1)`` +
    ``kronecker_mode``; see :doc:`/concepts/beyond` for how it relates to TNT and KL-Shampoo.
    """
    pre, pre_opts = routed("kronecker_mode", None, route_unmodelled=route_unmodelled, label="factored",
                           unmodelled=unmodelled)
    return compose(
        params,
        estimator="tensor_normal",
        inverter="damped_eigen",
        preconditioner=pre,
        estimator_options={"evidence": evidence, "estimate": "kl", "stat_decay": stat_decay,
                           "kl_damping": kl_damping},
        inverter_options={"power": 1.0},
        preconditioner_options=pre_opts,
        lr=lr, momentum=momentum, weight_decay=weight_decay, damping=damping,
        curvature_every=curvature_every, invert_every=invert_every, max_factor_dim=max_factor_dim,
        model=model, **options,
    )


@register("method", "Muon")
def Muon(
    params: Iterable[Any],
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients: Sequence[float] = (3.4445, -4.7750, 2.0315),
    eps: float = 1e-7,
    ns_steps: int = 5,
    adjust_lr_fn: str | None = "original",
    iteration_dtype: str = "bfloat16",
    route_unmodelled: str | None = "adamw",
    unmodelled: Sequence[str] = (),
    adamw_lr: float | None = None,
    adamw_betas: Sequence[float] = (0.9, 0.999),
    adamw_eps: float = 1e-8,
    model: nn.Module | None = None,
    **options: Any,
) -> CurvatureOptimizer:
    r"""Muon (Jordan et al., 2024; Liu et al., 2025, arXiv 2502.16982): orthogonalised Nesterov
    momentum for matrices, AdamW for the rest, in one optimizer.

    For each block whose view is a matrix (convolution weights flattened to
    :math:`(c_\text{out}, c_\text{in} k_h k_w)`):

    .. math::
        M &\leftarrow \mu M + (1 - \mu) G, \qquad B = (1 - \mu) G + \mu M \ \text{(Nesterov)}, \\
        W &\leftarrow W (1 - \eta\lambda) - \eta\, r(A, B)\, \mathrm{NS}_5(B),

    with :math:`\mathrm{NS}_5` five quintic Newton--Schulz steps in bfloat16 and :math:`r` the
    ``adjust_lr_fn`` ratio, exactly ``torch.optim.Muon`` (its defaults: ``lr=1e-3,
    weight_decay=0.1, momentum=0.95, nesterov=True``, coefficients ``(3.4445, -4.7750, 2.0315)``,
    ``eps=1e-7``, 5 steps, ``"original"``); the matrices of one shape are orthogonalised in one
    batched iteration. With ``route_unmodelled="adamw"`` (default) vectors and scalars, embeddings
    (found through ``model=``) and blocks matching the ``unmodelled`` name patterns (an output
    head, say ``("fc_out.*",)``) get ``torch.optim.AdamW``'s update with ``adamw_betas``,
    ``adamw_eps``, the same weight decay and learning rate ``adamw_lr`` (default ``lr``; with
    ``adjust_lr_fn="match_rms_adamw"`` one learning rate suits both, Liu et al.; a separate
    ``adamw_lr`` puts those parameters in a second param group, so pass plain parameters). Parts: ``none`` + ``identity`` + ``partition`` of ``muon`` and ``adamw``.
    """
    adjust = "original" if adjust_lr_fn is None else adjust_lr_fn
    a1, a2 = _betas("adamw_betas", adamw_betas)
    patterns = tuple(unmodelled) + _embedding_names(model) if route_unmodelled else tuple(unmodelled)
    if adamw_lr is not None:
        check_positive("adamw_lr", adamw_lr)
        if route_unmodelled is None:
            raise ValueError("adamw_lr needs route_unmodelled='adamw' (no block goes to AdamW otherwise)")
        params = _split_for_adamw(params, model, patterns, adamw_lr)
    pre, pre_opts = routed(
        "muon",
        {"nesterov": nesterov, "momentum": momentum, "dampening": momentum,
         "coefficients": tuple(ns_coefficients), "ns_steps": ns_steps, "eps": eps, "adjust_lr": adjust,
         "iteration_dtype": iteration_dtype},
        route_unmodelled=route_unmodelled, label="matrix",
        unmodelled=tuple(unmodelled) + _embedding_names(model) if route_unmodelled else tuple(unmodelled),
        adamw_options={"beta1": a1, "beta2": a2, "eps": adamw_eps},
    )
    return compose(
        params,
        estimator="none",
        inverter="identity",
        preconditioner=pre,
        preconditioner_options=pre_opts,
        lr=lr, momentum=momentum, dampening=momentum, weight_decay=weight_decay, damping=1.0,
        curvature_every=1, invert_every=1, max_factor_dim=None, model=model, **options,
    )
