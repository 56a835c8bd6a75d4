r"""The ``mode_diagonal`` estimator: diagonals of the mode Gram matrices.

For a block whose gradient :math:`G` has the view :math:`d_1 \times \cdots \times d_k`, mode
:math:`i` keeps the vector of squared entries summed over every other axis,

.. math:: r_i[a] = \sum_{\text{all indices with } i\text{-th} = a} G^2
          = \big(G_{(i)} G_{(i)}^\top\big)_{aa},

the diagonal of the mode Gram matrix that TNT and Shampoo keep in full, as an EMA
:math:`r_i \leftarrow \beta r_i + (1 - \beta)\,\hat r_i` (the first update sets :math:`r_i`).
Statistics cost :math:`k \prod_j d_j` flops and :math:`\sum_i d_i` memory instead of
:math:`\prod_j d_j \sum_i d_i` and :math:`\sum_i d_i^2`; the factor handed to the inverter is
:math:`\mathrm{diag}(r_i)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from curvkit import Block, BlockEvidence, CurvatureEstimator, EvidenceSpec, Factor, PartConfig, Source
from curvkit.config import check_choice, check_in_unit_interval

__all__ = ["ModeDiagonal", "ModeDiagonalConfig"]


@dataclass(frozen=True)
class ModeDiagonalConfig(PartConfig):
    """Options of :class:`ModeDiagonal`.

    Attributes:
        stat_decay: EMA decay :math:`\\beta` of the diagonals.
        evidence: ``"empirical"`` (the minibatch gradient, as Shampoo) or ``"sampled"`` (the
            gradient with targets sampled from the model, as TNT).
    """

    stat_decay: float = 0.9
    evidence: str = "empirical"

    def __post_init__(self) -> None:
        check_in_unit_interval("stat_decay", self.stat_decay)
        check_choice("evidence", self.evidence, ("empirical", "sampled"))


class ModeDiagonal(CurvatureEstimator):
    """Per-mode diagonal second moments of the gradient (see the module docstring)."""

    Config = ModeDiagonalConfig

    @property
    def evidence(self) -> EvidenceSpec:
        return EvidenceSpec(source=Source.SAMPLED if self.config.evidence == "sampled" else Source.MINIBATCH)

    def init_state(self, block: Block) -> dict[str, Any]:
        ref = block.params[0]
        dtype = torch.float32 if ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype
        diagonals = [
            torch.zeros(d, dtype=dtype, device=ref.device) if factored else None
            for d, factored in zip(block.shape, block.factored)
        ]
        return {"diagonals": diagonals, "updates": 0}

    def update(self, block: Block, state: dict[str, Any], evidence: BlockEvidence, *,
               decay: float | None = None) -> None:
        if all(g is None for g in evidence.gradients):
            return
        if decay is None:  # the estimator's own rule: the first update sets, then an EMA
            decay = 0.0 if state["updates"] == 0 else self.config.stat_decay
        diagonals = [r for r in state["diagonals"] if r is not None]
        if diagonals:
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(evidence.gradients, block.params)]
            squared = block.to_view(grads).to(diagonals[0].dtype).square()
            for mode, r in enumerate(state["diagonals"]):
                if r is not None:
                    others = [axis for axis in range(squared.dim()) if axis != mode]
                    r.mul_(decay).add_(squared.sum(dim=others) if others else squared, alpha=1.0 - decay)
        state["updates"] += 1

    def factors(self, block: Block, state: dict[str, Any], *, damping: float) -> list[Factor | None] | None:
        if state["updates"] == 0:
            return None
        return [None if r is None else Factor(torch.diag(r), damping) for r in state["diagonals"]]

    def check_state(self, block: Block, state: dict[str, Any]) -> None:
        diagonals = state.get("diagonals")
        if diagonals is None or len(diagonals) != block.order:
            raise ValueError(f"block {block.name!r}: saved statistics do not match its {block.order} modes")
        for d, factored, r in zip(block.shape, block.factored, diagonals):
            if (r is None) == factored or (r is not None and tuple(r.shape) != (d,)):
                raise ValueError(f"block {block.name!r}: saved diagonal {None if r is None else tuple(r.shape)} "
                                 f"does not fit a mode of size {d}")
