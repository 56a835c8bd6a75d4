r"""The ``tensor_normal`` estimator of Tensor Normal Training (Ren & Goldfarb, 2021).

TNT models the sampling-based gradient :math:`G \in \mathbb{R}^{d_1 \times \cdots \times d_k}` of
a parameter tensor as tensor-normal, :math:`\mathrm{vec}(G) \sim \mathcal N(0, U_1 \otimes \cdots
\otimes U_k)`, so the true Fisher block :math:`E[\mathrm{vec}(G)\mathrm{vec}(G)^\top]` is a
Kronecker product of one small SPD factor per mode.

Statistics (every ``curvature_every`` steps): for each mode :math:`i`,

.. math:: S_i \leftarrow \beta S_i + (1 - \beta)\, G_{(i)} G_{(i)}^\top ,

with :math:`G_{(i)}` the mode-:math:`i` unfolding of the sampled gradient; the first update sets
:math:`S_i = G_{(i)} G_{(i)}^\top`.

Same-trace normalisation (when factors are requested): with :math:`D = \prod_j d_j`,

.. math::
    c = \left(\frac{\operatorname{tr} S_1}{D}\right)^{1/k}, \qquad
    U_i = \frac{S_i}{c^{k-1} \prod_{j \ne i} d_j},

so that every :math:`U_i` has average eigenvalue :math:`c` and
:math:`U_1 \otimes \cdots \otimes U_k = (S_1 \otimes \cdots \otimes S_k) / (\operatorname{tr} S)^{k-1}`.
(All mode Grams share the trace :math:`\|G\|_F^2`, so :math:`\operatorname{tr} S_i` is the same
for every :math:`i`; it is tracked once as an EMA of :math:`\|G\|_F^2`.)

``estimate="kl"`` replaces the Gram update by the flip-flop (maximum-likelihood, equivalently
KL-minimising) update of the tensor-normal covariance (Dutilleul, 1999; Lin et al., 2025,
arXiv 2509.03378):

.. math::
    S_i \leftarrow \beta S_i + (1 - \beta)\,
        \frac{G_{(i)} \big(\textstyle\bigotimes_{j \ne i} (S_j + \delta_j I)^{-1}\big) G_{(i)}^\top}
             {\prod_{j \ne i} d_j},

every factor computed from the others' *previous* values (a simultaneous update), with
:math:`\delta_j = \delta\,\operatorname{tr}(S_j)/d_j` (``kl_damping`` :math:`\delta`, relative to the
mean eigenvalue). After each update the factors are rescaled to a common mean eigenvalue
(their Kronecker product unchanged), so the scale split, to which the model is blind, cannot
drift towards overflow. Its fixed point under :math:`E[\cdot]` is
:math:`S_1 \otimes \cdots \otimes S_k = E[\mathrm{vec}(G)\mathrm{vec}(G)^\top]` when the
gradient is tensor-normal, which the Gram update only reaches when the other factors are
multiples of the identity. The first update (no statistics yet) uses :math:`S_j = I`. The
normalisation then only balances the scales, :math:`U_i = S_i\,\bar c / c_i` with
:math:`c_i = \operatorname{tr}(S_i)/d_i` and :math:`\bar c` their geometric mean, which keeps
:math:`U_1 \otimes \cdots \otimes U_k = S_1 \otimes \cdots \otimes S_k`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from ..blocks import Block
from ..config import check_choice, check_in_unit_interval, check_positive
from ..contractions import mode_gram, mode_products
from ..engine.finite import stack_flags
from ..interfaces import BlockEvidence, CurvatureEstimator, EvidenceSpec, Factor, PartConfig, Source
from ..registry import register

__all__ = ["TensorNormal", "TensorNormalConfig", "statistics_dtype"]


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are kept in float32 for half-precision parameters, else in the param dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclass(frozen=True)
class TensorNormalConfig(PartConfig):
    r"""Options of :class:`TensorNormal`.

    Attributes:
        stat_decay: EMA decay :math:`\beta` of the mode statistics (0.9 in the paper).
        evidence: ``"sampled"`` (gradient of the loss with targets sampled from the model, the
            true Fisher: TNT) or ``"empirical"`` (the minibatch gradient: the paper's ablation).
        normalize: apply the same-trace normalisation (TNT); ``False`` inverts the raw
            statistics.
        relative_damping: scale-free damping. ``False`` (the paper) adds the absolute
            :math:`\\epsilon` to every normalised factor, so where damping dominates a block of
            ``k`` modes moves about :math:`g / \\epsilon^k` -- the preconditioner's shape then
            depends on the block's order and on the evidence's scale. ``True`` adds
            :math:`\\epsilon c` to each factor, :math:`c` being the normalised factors' common
            average eigenvalue, so the damping is a fixed fraction of each factor's own
            spectrum: scaling the evidence by :math:`s` scales the direction by exactly
            :math:`1/s^2`, its shape unchanged (see the tuning guide).
        estimate: ``"gram"`` (the paper's mode-Gram EMA) or ``"kl"`` (the flip-flop
            maximum-likelihood update of the tensor-normal covariance; see the module docstring).
        kl_damping: with ``estimate="kl"``, the relative damping :math:`\delta` of the inverses of
            the other factors inside the update (:math:`\delta\,\operatorname{tr}(S_j)/d_j` is
            added to :math:`S_j`).
    """

    stat_decay: float = 0.9
    evidence: str = "sampled"
    normalize: bool = True
    relative_damping: bool = False
    estimate: str = "gram"
    kl_damping: float = 1e-3

    def __post_init__(self) -> None:
        check_in_unit_interval("stat_decay", self.stat_decay)
        check_choice("evidence", self.evidence, ("sampled", "empirical"))
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be a bool, got {self.normalize!r}")
        if not isinstance(self.relative_damping, bool):
            raise ValueError(f"relative_damping must be a bool, got {self.relative_damping!r}")
        check_choice("estimate", self.estimate, ("gram", "kl"))
        check_positive("kl_damping", self.kl_damping)


@register("estimator", "tensor_normal")
class TensorNormal(CurvatureEstimator):
    """Per-mode Kronecker factors of the (sampled) gradient covariance, as in TNT."""

    Config = TensorNormalConfig
    state_neutral_options = ("stat_decay", "relative_damping")

    @property
    def evidence(self) -> EvidenceSpec:
        source = Source.SAMPLED if self.config.evidence == "sampled" else Source.MINIBATCH
        # the traces of the grouped update read the evidence's squared norms (not the KL estimate)
        return EvidenceSpec(source=source, squared_norms=self.config.estimate != "kl")

    def init_state(self, block: Block) -> dict[str, Any]:
        ref = block.params[0]
        dtype = statistics_dtype(ref.dtype)
        grams: list[Tensor | None] = [
            torch.zeros(d, d, dtype=dtype, device=ref.device) if f else None
            for d, f in zip(block.shape, block.factored)
        ]
        return {
            "grams": grams,
            "trace": torch.zeros((), dtype=dtype, device=ref.device),
            "updates": 0,
        }

    def check_state(self, block: Block, state: dict[str, Any]) -> None:
        grams = state.get("grams")
        if grams is None or len(grams) != block.order:
            raise ValueError(f"block {block.name!r}: saved statistics do not match its {block.order} modes")
        for d, f, s in zip(block.shape, block.factored, grams):
            if (s is None) == f or (s is not None and tuple(s.shape) != (d, d)):
                got = None if s is None else tuple(s.shape)
                raise ValueError(
                    f"block {block.name!r}: saved statistic of shape {got} does not fit mode of size {d}"
                )

    def update(
        self,
        block: Block,
        state: dict[str, Any],
        evidence: BlockEvidence,
        *,
        decay: float | None = None,
    ) -> None:
        grads = evidence.gradients
        if all(g is None for g in grads):
            return
        dtype = state["trace"].dtype
        filled = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, block.params)]
        g = block.to_view(filled).to(dtype)
        if decay is None:
            decay = 0.0 if state["updates"] == 0 else self.config.stat_decay
        weight = 1.0 - decay
        if self.config.estimate == "kl":
            new = _kl_statistics(g, state["grams"], first=state["updates"] == 0, damping=self.config.kl_damping)
        else:
            new = [None if s is None else mode_gram(g, i) for i, s in enumerate(state["grams"])]
        # S <- decay S + (1 - decay) S_new as one lerp per statistic; invalid evidence (zeros) takes
        # weight 0 and leaves the statistics exactly as they were, decided on the device
        take: float | Tensor = weight if evidence.valid is None else evidence.valid.to(dtype) * weight
        flat = g.reshape(-1)
        new_trace = torch.dot(flat, flat)
        for s, n in zip(state["grams"], new):
            if s is not None:
                s.lerp_(n, take)
        state["trace"].lerp_(new_trace, take)
        if self.config.estimate == "kl":  # keep the scale split even (the model is invariant to it)
            for s, f in zip(state["grams"], _balanced(state["grams"], 0.0)):
                if s is not None:
                    s.copy_(f.matrix)
        state["updates"] += 1

    def update_group(
        self,
        blocks: Sequence[Block],
        states: Sequence[dict[str, Any]],
        evidence: Sequence[BlockEvidence],
        *,
        decay: float | None = None,
    ) -> list[bool | None]:
        r""":meth:`update` for several blocks: the same statistics, with every block's EMA
        (:math:`S \leftarrow S + w (\hat S - S)`, its trace included) in one
        ``torch._foreach_lerp_`` per dtype and device and every trace from one
        ``torch._foreach_norm`` (or from the ``squared_norm`` of :class:`~curvkit.BlockEvidence`, the
        finiteness check's norms, where every block of the dtype has one in the statistics'
        dtype). A subclass that overrides :meth:`update` gets its own :meth:`update` per block."""
        if self.config.estimate == "kl" or len(blocks) < 2 or type(self).update is not TensorNormal.update:
            # a subclass that overrides update() keeps its own rule for every block
            return super().update_group(blocks, states, evidence, decay=decay)
        buckets: dict[tuple[torch.dtype, torch.device], list[tuple[Tensor, dict[str, Any], float, Tensor | None, Tensor | None]]] = {}
        fixed_rate = None if decay is None else 1.0 - decay
        later_rate = 1.0 - self.config.stat_decay
        for block, state, ev in zip(blocks, states, evidence):
            grads = ev.gradients
            if len(grads) == 1:  # one parameter per block (the common case): no scans
                if grads[0] is None:
                    continue
            elif all(g is None for g in grads):
                continue
            elif any(g is None for g in grads):
                grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, block.params)]
            trace = state["trace"]
            dtype = trace.dtype
            g = block.to_view(grads)
            if g.dtype != dtype:
                g = g.to(dtype)
            rate = fixed_rate if fixed_rate is not None else (1.0 if state["updates"] == 0 else later_rate)
            sq = ev.squared_norm
            if sq is not None and sq.dtype != dtype:
                sq = None
            key = (dtype, trace.device)
            members = buckets.get(key)
            if members is None:
                members = buckets[key] = []
            members.append((g, state, rate, ev.valid, sq))
            state["updates"] += 1
        for (dtype, device), members in buckets.items():
            targets: list[Tensor] = [m[1]["trace"] for m in members]
            news: list[Tensor] = [m[4] for m in members]  # type: ignore[misc]  # ||G||^2, the new trace
            if any(n is None for n in news):
                norms = torch._foreach_norm([m[0] for m in members])
                news = list(torch._foreach_mul(norms, norms))
            owner = list(range(len(members)))  # the member each statistic belongs to
            for j, (g, state, _, _, _) in enumerate(members):
                for i, stat in enumerate(state["grams"]):
                    if stat is not None:
                        targets.append(stat)
                        news.append(mode_gram(g, i))
                        owner.append(j)
            valids = [m[3] for m in members]
            if all(v is None for v in valids):
                torch._foreach_lerp_(targets, news, [members[j][2] for j in owner])
                continue
            # invalid evidence (zeros) takes weight 0: its statistics stay exactly as they were
            if any(v is None for v in valids):
                true = torch.ones((), dtype=torch.bool, device=device)
                valids = [true if v is None else v for v in valids]
            valid = stack_flags(valids).to(dtype)  # type: ignore[arg-type]  # (a copy: another dtype)
            rates = {m[2] for m in members}
            if len(rates) == 1:
                takes = (valid * rates.pop()).unbind(0)
            else:
                takes = (valid * torch.tensor([m[2] for m in members], dtype=dtype, device=device)).unbind(0)
            torch._foreach_lerp_(targets, news, [takes[j] for j in owner])
        return [None] * len(blocks)

    def factors(self, block: Block, state: dict[str, Any], *, damping: float) -> list[Factor | None] | None:
        if state["updates"] == 0:
            return None
        grams = state["grams"]
        if not self.config.normalize:
            return [None if s is None else Factor(s, damping) for s in grams]
        if self.config.estimate == "kl":
            return _balanced(grams, damping)
        k = block.order
        total = math.prod(block.shape)
        c = (state["trace"] / total).clamp_min(0).pow(1.0 / k)
        tiny = torch.finfo(c.dtype).tiny
        if self.config.relative_damping:  # eps times the common average eigenvalue c (0-d tensor)
            damping = damping * c.clamp_min(tiny)
        out: list[Factor | None] = []
        for d, s in zip(block.shape, grams):
            if s is None:
                out.append(None)
                continue
            scale = (c.pow(k - 1) * (total // d)).clamp_min(tiny)
            out.append(Factor(s / scale, damping))
        return out


def _kl_statistics(g: Tensor, grams: list[Tensor | None], *, first: bool, damping: float) -> list[Tensor | None]:
    r"""One flip-flop sample per factored mode: :math:`G_{(i)} (\bigotimes_{j\ne i} S_j^{-1}) G_{(i)}^\top
    / \prod_{j\ne i} d_j` from the previous :math:`S_j` (identity for unfactored modes, and for all
    modes when ``first``).

    With the Cholesky factor :math:`S_j + \delta_j I = L_j L_j^\top` and :math:`W_j = L_j^{-1}`
    (so :math:`W_j^\top W_j = (S_j + \delta_j I)^{-1}`), the sample is the mode-:math:`i` Gram of
    :math:`G \times_{j \ne i} W_j`, PSD by construction.
    """
    total = g.numel()
    whiten: list[Tensor | None] = [None] * len(grams)
    if not first:
        for j, s in enumerate(grams):
            if s is None:
                continue
            d = s.shape[0]
            mean = (torch.diagonal(s).sum() / d).clamp_min(torch.finfo(s.dtype).tiny)
            eye = torch.eye(d, dtype=s.dtype, device=s.device)
            # Cholesky of the damped factor scaled to mean eigenvalue 1: robust where a float32
            # eigh of a rank-deficient factor (many equal eigenvalues) fails to converge
            chol, _ = torch.linalg.cholesky_ex(0.5 * (s + s.T) / mean + damping * eye)
            whiten[j] = torch.linalg.solve_triangular(chol, eye, upper=False) * mean.rsqrt()
    out: list[Tensor | None] = []
    for i, s in enumerate(grams):
        if s is None:
            out.append(None)
            continue
        mats = [None if (j == i or w is None) else w for j, w in enumerate(whiten)]
        y = mode_products(g, mats) if any(m is not None for m in mats) else g
        out.append(mode_gram(y, i) / (total // g.shape[i]))
    return out


def _balanced(grams: list[Tensor | None], damping: float) -> list[Factor | None]:
    r"""KL factors rescaled to a common mean eigenvalue (their Kronecker product unchanged)."""
    present = [s for s in grams if s is not None]
    if not present:
        return [None] * len(grams)
    tiny = torch.finfo(present[0].dtype).tiny
    means = [(torch.diagonal(s).sum() / s.shape[0]).clamp_min(tiny) for s in present]
    common = torch.exp(torch.stack([m.log() for m in means]).mean())
    it = iter(means)
    return [None if s is None else Factor(s * (common / next(it)), damping) for s in grams]
