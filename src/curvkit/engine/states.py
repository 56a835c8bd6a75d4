"""The per-block state store: each block's state lives in ``optimizer.state[first param]``."""

from __future__ import annotations

from typing import Any

import torch

from ..blocks import Block
from ..interfaces import CurvatureEstimator, Preconditioner

__all__ = ["BlockStates"]


class BlockStates:
    """Creates and returns the nested state of a block (estimator, preconditioner, inverses,
    momentum), stored in the optimizer's ``state`` mapping under the block's first parameter.

    It holds the mapping itself, not the optimizer, so collaborators can reach block states
    without keeping the optimizer alive.
    """

    def __init__(self, state: dict, estimator: CurvatureEstimator, preconditioner: Preconditioner) -> None:
        self.state = state
        self.estimator = estimator
        self.preconditioner = preconditioner

    def __call__(self, block: Block) -> dict[str, Any]:
        state = self.state[block.params[0]]
        if not state:
            state["estimator"] = self.estimator.init_state(block)
            state["preconditioner"] = self.preconditioner.init_state(block)
            state["inverses"] = None
            state["momentum"] = None
        return state

    def complete(self, block: Block, *, momentum: bool, eigenbasis: bool, inverses: bool) -> None:
        """Give a fresh block state every tensor it will hold, with neutral values (zero
        momentum, identity inverses), so its structure is the same before and after training:
        ``torch.distributed.checkpoint`` loads into the structure of the live state."""
        from ..estimators.tensor_normal import statistics_dtype
        from ..operators import EigenBasis

        state = self(block)
        ref = block.params[0]
        dtype = statistics_dtype(ref.dtype)
        if momentum and state["momentum"] is None:
            state["momentum"] = torch.zeros(block.shape, dtype=dtype, device=ref.device)
        if inverses and state["inverses"] is None:
            entries: list[Any] = []
            # one entry per factor: per mode, or per (tile, mode) for layouts that declare
            # ``factor_sizes`` (tiled views with statistics per tile)
            sizes = tuple(getattr(block.layout, "factor_sizes", block.shape))
            for j, d in enumerate(sizes):
                f = block.factored[j % block.order]
                if not f:
                    entries.append(None)
                    continue
                eye = torch.eye(d, dtype=dtype, device=ref.device)
                entries.append(EigenBasis(eye, torch.ones(d, dtype=dtype, device=ref.device), 0) if eigenbasis else eye)
            state["inverses"] = entries

    def estimator_state(self, block: Block) -> dict[str, Any]:
        """The estimator's part of the block state."""
        return self(block)["estimator"]
