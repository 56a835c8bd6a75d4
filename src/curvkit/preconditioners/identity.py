"""The ``identity`` preconditioner: the direction is the buffer itself (SGD with momentum)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from torch import Tensor

from ..blocks import Block
from ..interfaces import PartConfig, Preconditioner
from ..registry import register

__all__ = ["IdentityPreconditioner"]


@dataclass(frozen=True)
class IdentityPreconditionerConfig(PartConfig):
    """:class:`IdentityPreconditioner` has no options."""


@register("preconditioner", "identity")
class IdentityPreconditioner(Preconditioner):
    """:math:`P = M`: ignores curvature (a baseline, and the fallback of unsupported blocks)."""

    Config = IdentityPreconditionerConfig
    traceable = True

    def describe(self, block: Block) -> str:
        """What the block gets."""
        return "momentum (no curvature)"

    def apply(
        self,
        block: Block,
        state: dict[str, Any],
        direction: Tensor,
        inverses: Sequence[Tensor | None] | None,
        *,
        gradient: Tensor,
    ) -> Tensor:
        return direction
