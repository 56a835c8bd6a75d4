r"""The ``kronecker_mode`` preconditioner: one matrix per tensor mode, applied as mode products."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from torch import Tensor

from ..blocks import Block
from ..contractions import mode_products
from ..interfaces import PartConfig, Preconditioner
from ..registry import register

__all__ = ["KroneckerMode"]


@dataclass(frozen=True)
class KroneckerModeConfig(PartConfig):
    """:class:`KroneckerMode` has no options."""


@register("preconditioner", "kronecker_mode")
class KroneckerMode(Preconditioner):
    r"""Direction :math:`P = M \times_1 V_1 \times_2 V_2 \cdots \times_k V_k`.

    Equivalently :math:`\mathrm{vec}(P) = (V_1 \otimes \cdots \otimes V_k)\,\mathrm{vec}(M)`, the
    Kronecker-factored preconditioner applied without ever forming the Kronecker product
    (cost :math:`\sum_i d_i \prod_j d_j` instead of :math:`(\prod_j d_j)^2`). Modes whose matrix
    is ``None`` are left unchanged. A block with no inverses yet gets ``M`` itself.
    """

    Config = KroneckerModeConfig

    def apply(
        self,
        block: Block,
        state: dict[str, Any],
        direction: Tensor,
        inverses: Sequence[Tensor | None] | None,
        *,
        gradient: Tensor,
    ) -> Tensor:
        if inverses is None:
            return direction
        return mode_products(direction, [None if v is None else v.to(direction.dtype) for v in inverses])
