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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..blocks import Block
from ..config import check_choice, check_in_unit_interval
from ..contractions import mode_gram
from ..interfaces import BlockEvidence, CurvatureEstimator, EvidenceSpec, Factor, PartConfig, Source
from ..registry import register

__all__ = ["TensorNormal", "TensorNormalConfig", "statistics_dtype"]


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are kept in float32 for half-precision parameters, else in the param dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclass(frozen=True)
class TensorNormalConfig(PartConfig):
    """Options of :class:`TensorNormal`.

    Attributes:
        stat_decay: EMA decay :math:`\\beta` of the mode statistics (0.9 in the paper).
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
    """

    stat_decay: float = 0.9
    evidence: str = "sampled"
    normalize: bool = True
    relative_damping: bool = False

    def __post_init__(self) -> None:
        check_in_unit_interval("stat_decay", self.stat_decay)
        check_choice("evidence", self.evidence, ("sampled", "empirical"))
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be a bool, got {self.normalize!r}")
        if not isinstance(self.relative_damping, bool):
            raise ValueError(f"relative_damping must be a bool, got {self.relative_damping!r}")


@register("estimator", "tensor_normal")
class TensorNormal(CurvatureEstimator):
    """Per-mode Kronecker factors of the (sampled) gradient covariance, as in TNT."""

    Config = TensorNormalConfig
    state_neutral_options = ("stat_decay", "relative_damping")

    @property
    def evidence(self) -> EvidenceSpec:
        source = Source.SAMPLED if self.config.evidence == "sampled" else Source.MINIBATCH
        return EvidenceSpec(source=source)

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
        if evidence.valid is not None:  # invalid evidence (zeros) leaves the statistics exactly as they were
            invalid = ~evidence.valid
            keep = torch.full((), decay, dtype=dtype, device=invalid.device).masked_fill_(invalid, 1.0)
            take = torch.full((), weight, dtype=dtype, device=invalid.device).masked_fill_(invalid, 0.0)
            for i, s in enumerate(state["grams"]):
                if s is not None:
                    s.mul_(keep).add_(mode_gram(g, i).mul_(take))
            state["trace"].mul_(keep).add_(torch.sum(g * g) * take)
        else:
            for i, s in enumerate(state["grams"]):
                if s is not None:
                    s.mul_(decay).add_(mode_gram(g, i), alpha=weight)
            state["trace"].mul_(decay).add_(torch.sum(g * g), alpha=weight)
        state["updates"] += 1

    def factors(self, block: Block, state: dict[str, Any], *, damping: float) -> list[Factor | None] | None:
        if state["updates"] == 0:
            return None
        grams = state["grams"]
        if not self.config.normalize:
            return [None if s is None else Factor(s, damping) for s in grams]
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
