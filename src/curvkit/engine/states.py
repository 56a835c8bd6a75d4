"""The per-block state store: each block's state lives in ``optimizer.state[first param]``."""

from __future__ import annotations

from typing import Any

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

    def estimator_state(self, block: Block) -> dict[str, Any]:
        """The estimator's part of the block state."""
        return self(block)["estimator"]
