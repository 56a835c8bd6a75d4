"""The ``none`` estimator: no curvature statistics (for first-order preconditioners such as
``muon`` and ``adamw`` composed through the same optimizer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..blocks import Block, default_block
from ..interfaces import BlockEvidence, CurvatureEstimator, EvidenceSpec, Factor, PartConfig, Source
from ..registry import register

__all__ = ["NoCurvature", "NoCurvatureConfig"]


@dataclass(frozen=True)
class NoCurvatureConfig(PartConfig):
    """:class:`NoCurvature` has no options."""


@register("estimator", "none")
class NoCurvature(CurvatureEstimator):
    """Collects nothing; every block's inverses stay ``None`` (the preconditioner works from the
    buffer and gradient alone). Its evidence is the minibatch gradient, so no
    ``update_curvature`` call is needed, and reading it costs nothing."""

    Config = NoCurvatureConfig

    @property
    def evidence(self) -> EvidenceSpec:
        return EvidenceSpec(source=Source.MINIBATCH)

    def plan(
        self,
        named_params: Sequence[tuple[str, torch.nn.Parameter, int]],
        *,
        model: torch.nn.Module | None,
        max_factor_dim: int | None,
    ) -> list[Block]:
        """One block per parameter with the default view, every mode unfactored."""
        blocks = []
        for name, p, gi in named_params:
            block = default_block(name, p, gi, max_factor_dim=None)
            block.factored = tuple(False for _ in block.shape)
            block.kind = "first-order"
            block.rule += ", no curvature statistics"
            blocks.append(block)
        return blocks

    def init_state(self, block: Block) -> dict[str, Any]:
        return {}

    def check_state(self, block: Block, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"block {block.name!r}: the 'none' estimator keeps no statistics, got {sorted(state)}")

    def update(self, block: Block, state: dict[str, Any], evidence: BlockEvidence, *, decay: float | None = None) -> None:
        return None

    def factors(self, block: Block, state: dict[str, Any], *, damping: float) -> list[Factor | None] | None:
        return None
