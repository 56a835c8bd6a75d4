r"""EKFAC: KFAC with its eigenvalues re-estimated per coordinate (George et al., NeurIPS 2018).

*Fast Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis* (George, Laurent,
Bouthillier, Ballas, Vincent, 2018, arXiv 1806.03884) keeps KFAC's factors
:math:`A = E[a a^\top]` and :math:`G = E[g g^\top]` only for their eigenbases :math:`U_A, U_G`
(the *Kronecker-factored eigenbasis*, KFE), and replaces KFAC's eigenvalues
:math:`\lambda^G_i \lambda^A_j` by the second moments of the per-example gradients
:math:`\nabla_n = g_n a_n^\top` in that basis,

.. math::
    s_{ij} = E_n\big[(U_G^\top \nabla_n U_A)_{ij}^2\big],

which is the diagonal of the Fisher in the KFE, the best diagonal fit there
(:math:`s = \arg\min_s \| F - (U_G \otimes U_A) \operatorname{diag}(s) (U_G \otimes U_A)^\top \|_F`,
which the paper proves). The direction applied to the momentum buffer :math:`M` is

.. math::
    P = U_G \left[ \frac{U_G^\top M U_A}{s + \lambda} \right] U_A^\top
      = \big( (U_G \otimes U_A) \operatorname{diag}(s) (U_G \otimes U_A)^\top + \lambda I \big)^{-1} M .

Three parts, composed by the :func:`EKFAC` method:

* the ``ekfac`` estimator (:class:`EKFACEstimator`): KFAC's ``A`` and ``G`` (the same rows,
  scaling and EMA as ``kfac``) plus, at every statistics step (:math:`T_1`), the scalings
  :math:`\hat s` of the step's per-example gradients in the basis of the last inversion, folded
  into an EMA :math:`s`;
* the core ``eigenbasis`` inverter: :math:`U_G, U_A` by ``eigh`` at every inversion
  (:math:`T_2`); its eigenvalues are not used;
* the ``eigen_corrected`` preconditioner (:class:`EigenCorrected`): the direction above. It reads
  the estimator's statistics through the optimizer (``reads_statistics``), and when it sees a new
  basis (the ``version`` of the :class:`~curvkit.operators.EigenBasis` entries) it hands the basis
  to the statistics, re-expressing :math:`s` in it (below).

**Per-example gradients with weight sharing.** For ``nn.Linear`` every row of the layer (every
leading index, a sequence position included) is an example, as ``kfac`` counts them for ``A``
and ``G``, so :math:`\hat s = \frac1r \sum_r \big((U_G^\top c\,g_r)^{2}\big)\big((U_A^\top a_r)^{2}\big)^\top`
(no per-example gradient is formed). For ``nn.Conv2d`` the examples are the batch entries and
:math:`\nabla_n = c \sum_p g_{n,p} a_{n,p}^\top` is the true per-example gradient, summed over the
spatial positions :math:`p` (the paper defines :math:`s` over per-example gradients; this is
that gradient for a layer whose weight is shared over positions, not KFC's rows-as-examples
count, which would give a different :math:`s`); it costs :math:`N \cdot out \cdot in` entries per
layer per statistics step, formed in chunks of examples of at most
:data:`PER_EXAMPLE_ELEMENTS` entries. ``nn.Embedding`` rows are examples too, with the one-hot
input rotated by indexing :math:`U_A`. A weight tied across layers takes every call's rows as
more examples, as ``kfac`` does.

**Schedule, and where it differs from the paper's Algorithm 1.** The optimizer folds the evidence
of step :math:`t` before it inverts, so :math:`\hat s_t` is estimated in the basis in force
before step :math:`t`'s refresh (at the first step: the coordinate basis, i.e. the diagonal
Fisher). When the basis changes from :math:`U` to :math:`U'` the scalings are re-expressed as
the diagonal, in the new basis, of the eigen-corrected Fisher they defined in the old one,

.. math::
    s \leftarrow (R_G \odot R_G)\, s\, (R_A \odot R_A)^\top, \qquad R = U'^\top U,

which is exact for that Fisher's diagonal (and the identity when the basis did not move); the
paper instead re-estimates :math:`s` on the refresh step's minibatch in the new basis. Between
refreshes the two agree. Damping :math:`\lambda` is the optimizer's ``damping`` (as of the last
inversion), added to :math:`s` (the paper's :math:`\epsilon`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Sequence

import torch
from torch import Tensor, nn

from curvkit import (
    Block,
    BlockEvidence,
    CurvatureEstimator,
    CurvatureOptimizer,
    Factor,
    PartConfig,
    Preconditioner,
    compose,
    register,
    statistics_dtype,
)
from curvkit.config import check_choice, check_in_unit_interval
from curvkit.contractions import mode_products
from curvkit.operators import EigenBasis

from .estimator import KFACConfig, KFACEstimator, _is_embedding
from .layers import LAYER_KINDS, layer_rows
from .planning import plan_layers

__all__ = [
    "EKFAC", "EKFACConfig", "EKFACEstimator", "EigenCorrected", "EigenCorrectedConfig", "PER_EXAMPLE_ELEMENTS",
    "adopt_basis",
]

#: The most entries of per-example convolution gradients formed at once (examples are taken in
#: chunks of ``PER_EXAMPLE_ELEMENTS // (out * in)``, at least one).
PER_EXAMPLE_ELEMENTS = 2**24


@dataclass(frozen=True)
class EKFACConfig(KFACConfig):
    """Options of :class:`EKFACEstimator`: those of :class:`~curvkit_kfac.KFACConfig` (without
    ``pi_damping``, which only splits damping between eigenvalues EKFAC does not use) and

    Attributes:
        scale_decay: EMA decay of the scalings :math:`s`; ``None`` uses ``stat_decay``.
    """

    scale_decay: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pi_damping:
            raise ValueError(
                "pi_damping=True has no effect in ekfac (the damping is added to the scalings s, not split "
                "between the factors): leave pi_damping=False"
            )
        if self.scale_decay is not None:
            check_in_unit_interval("scale_decay", self.scale_decay)


@register("estimator", "ekfac")
class EKFACEstimator(KFACEstimator):
    r"""KFAC's factors plus EKFAC's per-coordinate scalings in their eigenbasis (module docstring).

    State of a layer block: KFAC's ``A``, ``G`` and ``updates``, and

    * ``scale``: :math:`s`, view-shaped (``(out, in [+ 1])``; ``(vocabulary, dim)`` for embeddings);
    * ``basis``: per view mode the basis :math:`s` is expressed in (identity at first, ``None`` on
      unfactored modes), set by the ``eigen_corrected`` preconditioner at each refresh;
    * ``basis_version``: the inverse version of that basis; ``scale_updates``: EMA count;
    * ``damping``: the optimizer's damping :math:`\lambda` at the last inversion (``None`` before
      one; the block then takes the plain momentum direction).
    """

    Config = EKFACConfig
    #: Marks an estimator whose state carries EKFAC's ``scale`` and ``basis`` (what
    #: :class:`EigenCorrected` reads).
    provides_scalings: ClassVar[bool] = True

    def plan(
        self,
        named_params: Sequence[tuple[str, nn.Parameter, int]],
        *,
        model: nn.Module | None,
        max_factor_dim: int | None,
    ) -> list[Block]:
        """The ``kfac`` plan (:func:`curvkit_kfac.planning.plan_layers`)."""
        return plan_layers(
            named_params, model=model, max_factor_dim=max_factor_dim, kinds=LAYER_KINDS, method="ekfac",
            fallback=self.config.fallback, fallback_option="fallback", tied="share",
        )

    def init_state(self, block: Block) -> dict[str, Any]:
        """KFAC's state plus zero scalings and identity bases (see the class docstring)."""
        state = super().init_state(block)
        if block.module is None:
            return state
        dtype = statistics_dtype(block.params[0].dtype)
        device = block.params[0].device
        state["scale"] = torch.zeros(block.shape, dtype=dtype, device=device)
        state["basis"] = [
            torch.eye(d, dtype=dtype, device=device) if f else None for d, f in zip(block.shape, block.factored)
        ]
        state["basis_version"] = 0
        state["scale_updates"] = 0
        state["damping"] = None
        return state

    def check_state(self, block: Block, state: dict[str, Any]) -> None:
        """KFAC's checks, plus the shapes of ``scale`` and ``basis``."""
        super().check_state(block, state)
        if block.module is None:
            return
        for key in ("scale", "basis", "basis_version", "scale_updates", "damping"):
            if key not in state:
                raise ValueError(f"block {block.name!r}: saved state has no ekfac entry {key!r} (saved by kfac?)")
        if tuple(state["scale"].shape) != tuple(block.shape):
            raise ValueError(
                f"block {block.name!r}: saved scalings of shape {tuple(state['scale'].shape)} do not fit the "
                f"view {tuple(block.shape)}"
            )
        for mode, (q, d, f) in enumerate(zip(state["basis"], block.shape, block.factored)):
            if (q is None) == f or (q is not None and tuple(q.shape) != (d, d)):
                got = None if q is None else tuple(q.shape)
                raise ValueError(f"block {block.name!r}: saved basis of mode {mode} of shape {got} does not fit size {d}")

    # ``update`` is KFAC's: :meth:`batch_statistics` then :meth:`fold` (these two add the scalings)
    @torch.no_grad()
    def batch_statistics(self, block: Block, state: dict[str, Any], evidence: BlockEvidence) -> dict[str, Any] | bool | None:
        r"""KFAC's sums, plus ``scale`` :math:`= \sum_n (U_G^\top \nabla_n U_A)^2` over the batch's
        examples in ``state["basis"]`` and their number ``scale_count``; several micro-batches of
        one step (one basis) add up to the whole batch's. With empirical evidence the gradients
        stay unscaled, as KFAC's ``G`` (:meth:`fold` applies :math:`c^2`)."""
        if block.module is None:
            return None
        stats = super().batch_statistics(block, state, evidence)
        if stats is False:
            return False
        sampled = self.config.evidence == "sampled"
        calls = self._calls(block, evidence)
        if not calls:
            return False
        c = self._gradient_scale(evidence, calls[0][1])
        total, count = self._scalings(block, state, calls, c if sampled else 1.0)
        out = dict(stats) if stats else {"batch": 0.0 if sampled else c}
        out.update(scale=total, scale_count=count)
        return out

    @torch.no_grad()
    def fold(self, block: Block, state: dict[str, Any], statistics: dict[str, Any], *, decay: float | None = None) -> None:
        r"""KFAC's fold of ``A`` and ``G``, then :math:`s \leftarrow \beta s + (1 - \beta) \hat s`
        with :math:`\hat s` = ``scale`` / ``scale_count`` (``decay=None``: :math:`\beta = 0` at the
        first update, ``scale_decay`` after; an explicit ``decay`` is used as it is, as for ``A``
        and ``G``)."""
        if state["A"] is None and state["G"] is None:  # kfac keeps no factor here: count the
            state["updates"] = max(state["updates"], 1)  # update so that factors() reports the modes
        else:
            super().fold(block, state, statistics, decay=decay)
        c2 = 1.0
        if self.config.evidence != "sampled":
            c = float(self.config.gradient_scale) if self.config.gradient_scale is not None else float(statistics["batch"])
            c2 = c * c
        s = state["scale"]
        if decay is None:
            decay = 0.0 if state["scale_updates"] == 0 else self._scale_decay
        s.mul_(decay).add_(statistics["scale"], alpha=(1.0 - decay) * c2 / statistics["scale_count"])
        state["scale_updates"] += 1

    @property
    def _scale_decay(self) -> float:
        cfg = self.config
        return cfg.stat_decay if cfg.scale_decay is None else cfg.scale_decay

    def _scalings(self, block: Block, state: dict[str, Any], calls: list, c: float) -> tuple[Tensor, int]:
        """``(sum over examples of the squared rotated per-example gradients, number of examples)``."""
        s = state["scale"]
        dtype = s.dtype
        q0, q1 = state["basis"]
        total = torch.zeros_like(s)
        count = 0
        if _is_embedding(block):  # view (vocabulary, dim): q0 rotates the one-hot input, q1 the gradient
            for _, ids, grad in calls:
                ids = ids.reshape(-1)
                g = grad.reshape(-1, grad.shape[-1]).to(dtype) * c
                g2 = (g if q1 is None else g @ q1).square()
                if q0 is None:
                    total.index_add_(0, ids, g2)
                else:
                    total.addmm_(q0[ids].square().T, g2)
                count += ids.shape[0]
            return total, count
        has_bias = len(block.params) == 2
        for module, inputs, grad in calls:
            r = layer_rows(module, inputs.to(dtype) if inputs.is_floating_point() else inputs, grad.to(dtype))
            a = r.activations
            if has_bias:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=dtype, device=a.device)], dim=1)
            a_rot = a if q1 is None else a @ q1  # rows of U_A^T a
            g_rot = r.gradients * c if q0 is None else (r.gradients * c) @ q0  # rows of U_G^T (c g)
            if isinstance(module, nn.Conv2d):  # per-example gradient: summed over the positions
                n = r.examples
                g_n, a_n = g_rot.reshape(n, -1, g_rot.shape[1]), a_rot.reshape(n, -1, a_rot.shape[1])
                step = max(1, PER_EXAMPLE_ELEMENTS // max(1, total.numel()))  # bounded memory
                for i in range(0, n, step):
                    per_example = torch.einsum("npo,npi->noi", g_n[i : i + step], a_n[i : i + step])
                    total += per_example.square().sum(0)
                count += n
            else:  # rank-one per row: ((U_G^T g)^2)((U_A^T a)^2)^T
                total.addmm_(g_rot.square().T, a_rot.square())
                count += a.shape[0]
        return total, count

    def factors(self, block: Block, state: dict[str, Any], *, damping: float) -> list[Factor | None] | None:
        """KFAC's factors (their eigenbases are what EKFAC uses); records ``damping`` for the
        ``eigen_corrected`` preconditioner."""
        out = super().factors(block, state, damping=damping)
        if out is not None:
            state["damping"] = damping
        return out


@dataclass(frozen=True)
class EigenCorrectedConfig(PartConfig):
    """:class:`EigenCorrected` has no options (its damping is the optimizer's ``damping``)."""


@register("preconditioner", "eigen_corrected")
class EigenCorrected(Preconditioner):
    r"""EKFAC's direction :math:`U_G [ (U_G^\top M U_A) / (s + \lambda) ] U_A^\top` (module docstring).

    Reads the ``ekfac`` estimator's statistics (``reads_statistics``); the bases are the
    ``eigenbasis`` inverter's. Blocks without statistics (``fallback`` blocks) get the momentum.
    """

    Config = EigenCorrectedConfig
    #: Eigenbases only (the ``eigenbasis`` inverter).
    accepts = ("eigenbasis",)
    #: It reads the ``ekfac`` estimator's scalings, passed by the optimizer as ``statistics``.
    reads_statistics = True

    def check_estimator(self, estimator: CurvatureEstimator) -> None:
        """Only an estimator that keeps EKFAC's scalings (``ekfac``) fits."""
        if not getattr(estimator, "provides_scalings", False):
            raise ValueError(
                f"preconditioner 'eigen_corrected' divides by the per-coordinate scalings of the 'ekfac' "
                f"estimator, which estimator {estimator.name!r} does not keep: compose it with estimator='ekfac'"
            )

    def describe(self, block: Block) -> str:
        """What the block gets."""
        if block.module is None or not any(block.factored):
            return "momentum (unfactored)" if block.module is None else "EKFAC: diagonal scalings (no factored mode)"
        names = ("A", "G") if isinstance(block.module, nn.Embedding) else ("G", "A")
        modes = ", ".join(
            f"U_{n} {d}x{d}" if f else f"{n} identity ({d})" for n, d, f in zip(names, block.shape, block.factored)
        )
        return f"EKFAC: Kronecker eigenbasis ({modes}) with {block.shape[0]}x{block.shape[1]} scalings"

    def apply_group(
        self,
        blocks: Sequence[Block],
        states: Sequence[dict[str, Any]],
        directions: Sequence[Tensor],
        inverses: Sequence[Sequence[Any] | None],
        *,
        gradients: Sequence[Tensor],
        statistics: Sequence[dict[str, Any]] | None = None,
    ) -> list[Tensor]:
        r"""Blocks whose two modes are both factored go through batched products
        (:math:`U_G^\top M U_A` for the whole group); the rest one :meth:`apply` each."""
        if statistics is None:
            raise ValueError(_NEEDS_STATISTICS)
        out: list[Tensor | None] = [None] * len(blocks)
        batch = []
        for i, (b, d, inv, st) in enumerate(zip(blocks, directions, inverses, statistics)):
            ready = "scale" in st and st["damping"] is not None and d.dim() == 2
            if ready and inv is not None:
                adopt_basis(st, inv)
            if ready and len(blocks) > 1 and all(q is not None for q in st["basis"]):
                batch.append(i)
            else:
                out[i] = self.apply(b, states[i], d, inv, gradient=gradients[i], statistics=st)
        if len(batch) == 1:
            i = batch[0]
            out[i] = self.apply(blocks[i], states[i], directions[i], inverses[i], gradient=gradients[i],
                                statistics=statistics[i])
        elif batch:
            sts = [statistics[i] for i in batch]
            work = sts[0]["scale"].dtype
            m = torch.stack([directions[i] for i in batch]).to(work)
            qg = torch.stack([st["basis"][0] for st in sts])
            qa = torch.stack([st["basis"][1] for st in sts])
            scale = torch.stack([st["scale"] for st in sts])
            lam = torch.stack([torch.as_tensor(st["damping"], dtype=work, device=m.device) for st in sts])
            rotated = qg.transpose(-1, -2) @ m @ qa / (scale + lam[:, None, None])
            res = (qg @ rotated @ qa.transpose(-1, -2)).to(directions[batch[0]].dtype)
            for i, r in zip(batch, res.unbind(0)):
                out[i] = r
        return out  # type: ignore[return-value]

    def apply(
        self,
        block: Block,
        state: dict[str, Any],
        direction: Tensor,
        inverses: Sequence[Any] | None,
        *,
        gradient: Tensor,
        statistics: dict[str, Any] | None = None,
    ) -> Tensor:
        if statistics is None:
            raise ValueError(_NEEDS_STATISTICS)
        if "scale" not in statistics or statistics["damping"] is None:  # fallback block, or no inversion yet
            return direction
        s = statistics["scale"]
        if inverses is not None:
            adopt_basis(statistics, inverses)
        bases = statistics["basis"]
        work = s.dtype
        rotated = mode_products(direction.to(work), [None if q is None else q.T for q in bases])
        rotated = rotated / (s + statistics["damping"])
        return mode_products(rotated, bases).to(direction.dtype)


_NEEDS_STATISTICS = (
    "preconditioner 'eigen_corrected' needs each block's estimator statistics (statistics=[...]); the optimizer "
    "passes them when the preconditioner is used directly (not inside a 'partition')"
)


def adopt_basis(statistics: dict[str, Any], inverses: Sequence[Any]) -> None:
    r"""Make the ``eigenbasis`` inverter's newest bases the statistics' basis, in place.

    When the :class:`~curvkit.operators.EigenBasis` version differs from ``basis_version``, the
    scalings are re-expressed as the diagonal of the old eigen-corrected Fisher in the new basis,
    :math:`s \leftarrow s \times_i (R_i \odot R_i)` with :math:`R_i = U_i'^\top U_i`, and the new
    bases are copied into ``statistics["basis"]``. Reads nothing on the host.
    """
    version = next((int(e.version) for e in inverses if isinstance(e, EigenBasis)), None)
    if version is None or version == statistics["basis_version"]:
        return
    old = statistics["basis"]
    s = statistics["scale"]
    new = []
    for mode, (q_old, entry) in enumerate(zip(old, inverses)):
        if (q_old is None) != (entry is None) or (entry is not None and not isinstance(entry, EigenBasis)):
            raise ValueError(
                f"eigen_corrected got per-mode entries {[type(e).__name__ for e in inverses]} for a block whose "
                f"factored modes are {[q is not None for q in old]}: compose it with inverter='eigenbasis'"
            )
        new.append(None if entry is None else entry.vectors.to(s.dtype))
    mix = [None if q is None else (q.T @ q_old) ** 2 for q, q_old in zip(new, old)]
    s.copy_(mode_products(s, mix))
    for q_old, q in zip(old, new):
        if q is not None:
            q_old.copy_(q)
    statistics["basis_version"] = version


@register("method", "EKFAC")
def EKFAC(
    model_or_params: nn.Module | Iterable[Any],
    *,
    model: nn.Module | None = None,
    lr: float = 3e-3,
    damping: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    stat_decay: float = 0.9,
    scale_decay: float | None = None,
    curvature_every: int = 1,
    invert_every: int = 20,
    evidence: str = "sampled",
    fallback: str = "momentum",
    gradient_scale: float | None = None,
    max_factor_dim: int | None = 4096,
    nonfinite: str = "skip",
    seed: int | None = None,
) -> CurvatureOptimizer:
    r"""EKFAC (George et al., 2018): KFAC's eigenbasis with per-coordinate scalings.

    ``ekfac`` + ``eigenbasis`` + ``eigen_corrected`` (see :mod:`curvkit_kfac.ekfac`), with KFAC's
    schedule: scalings every ``curvature_every`` steps (:math:`T_1`), eigenbases every
    ``invert_every`` steps (:math:`T_2`), true-Fisher (sampled-target) evidence by default.
    Defaults: KFAC's ``lr=3e-3``, EMA 0.9, momentum 0.9, :math:`T_1 = 1`, :math:`T_2 = 20`; the
    paper gives no damping for this scale, and :math:`\lambda = 0.1` was stable over the
    learning rates of the digits-autoencoder grid (``benchmarks.settings``), where 0.03 and below
    diverged from ``lr=0.03`` up. The training loop is KFAC's::

        opt = curvkit_kfac.EKFAC(model)
        out = model(x)
        opt.zero_grad()
        opt.update_curvature(out, loss="cross_entropy")
        loss_fn(out, y).backward()
        opt.step()

    Args:
        model_or_params: the model, or parameters / param groups together with ``model=``.
        model: the model whose Linear, Conv2d and Embedding layers are watched.
        lr: learning rate.
        damping: :math:`\lambda`, added to every scaling (KFAC's :math:`\lambda` is split as
            :math:`\sqrt\lambda` per factor instead, so the two are not on the same scale).
        momentum: momentum of the buffer the direction is formed from.
        weight_decay: decoupled weight decay.
        stat_decay: EMA decay of ``A`` and ``G``.
        scale_decay: EMA decay of the scalings (``None``: ``stat_decay``).
        curvature_every: :math:`T_1`, steps between statistics (and scaling) updates.
        invert_every: :math:`T_2`, steps between eigenbasis refreshes.
        evidence: ``"sampled"`` (true Fisher) or ``"empirical"``.
        fallback: ``"momentum"`` or ``"error"`` for parameters of layers ekfac does not know.
        gradient_scale: per-example rescaling of output gradients (``None``: the batch size).
        max_factor_dim: modes larger than this stay in the coordinate basis.
        nonfinite: ``"skip"`` or ``"raise"`` on non-finite gradients or evidence.
        seed: seed of the optimizer's target sampler.
    """
    if isinstance(model_or_params, nn.Module):
        if model is not None and model is not model_or_params:
            raise ValueError(
                "EKFAC got a model as its first argument and a different model=; pass the model once "
                "(EKFAC(model)) or parameters with model= (EKFAC(model.parameters(), model=model))"
            )
        model = model_or_params
        params: Iterable[Any] = list(model.parameters())
    else:
        if model is None:
            raise ValueError(
                "EKFAC needs the model to record layer inputs and output gradients: pass EKFAC(model) or "
                "EKFAC(params, model=model)"
            )
        params = model_or_params
    check_choice("evidence", evidence, ("sampled", "empirical"))
    return compose(
        params,
        estimator="ekfac",
        preconditioner="eigen_corrected",
        inverter="eigenbasis",
        estimator_options={
            "stat_decay": stat_decay,
            "scale_decay": scale_decay,
            "evidence": evidence,
            "fallback": fallback,
            "gradient_scale": gradient_scale,
        },
        inverter_options={"power": 1.0},
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
