r"""The ``kronecker_mode`` preconditioner: one matrix per tensor mode, applied as mode products."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from ..blocks import Block, describe_kronecker
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
    traceable = True
    mixed_shapes = True

    def describe(self, block: Block) -> str:
        """What the block gets (``"Kronecker 2 modes: 64x64, 33x33"``)."""
        return describe_kronecker(block)

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
        dtype = direction.dtype
        return mode_products(
            direction,
            [v.to(dtype) if isinstance(v, Tensor) and v.dtype != dtype else v for v in inverses],
        )

    def apply_group(
        self,
        blocks: Sequence[Block],
        states: Sequence[dict[str, Any]],
        directions: Sequence[Tensor],
        inverses: Sequence[Sequence[Any] | None],
        *,
        gradients: Sequence[Tensor],
    ) -> list[Tensor]:
        r"""Blocks of order 1 or 2 whose inverses are dense matrices take the plain matrix
        products (:math:`V_1 M V_2^\top`), written out here on the CPU (the per-block calls
        through :meth:`apply` and :func:`~curvkit.contractions.mode_products` cost more Python
        than the products of a small layer); on an accelerator, several of one view shape go
        through one batched ``matmul`` (one kernel launch instead of several; on the CPU the
        stacking copies cost more than the calls they save); the rest (eigenbases, operators,
        higher orders) one by one. A subclass that overrides :meth:`apply` gets every block
        through it."""
        out: list[Tensor | None] = [None] * len(blocks)
        batches: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        own = type(self).apply is KroneckerMode.apply  # a subclass's apply() sees every block
        for i, (d, inv) in enumerate(zip(directions, inverses)):
            if inv is None:
                out[i] = d
                continue
            if not own:
                out[i] = self.apply(blocks[i], states[i], d, inv, gradient=gradients[i])
                continue
            dim = d.dim()
            if dim == 1 and len(inv) == 1:
                (v,) = inv
                if v is None or type(v) is Tensor:
                    if d.is_cpu:  # one product, written out (no batching on the CPU)
                        out[i] = d if v is None else (v if v.dtype == d.dtype else v.to(d.dtype)) @ d
                    else:
                        batches[(tuple(d.shape), (v is None,))].append(i)
                    continue
            elif dim == 2 and len(inv) == 2:
                v0, v1 = inv
                if (v0 is None or type(v0) is Tensor) and (v1 is None or type(v1) is Tensor):
                    if d.is_cpu:
                        dtype = d.dtype
                        r = d if v0 is None else (v0 if v0.dtype == dtype else v0.to(dtype)) @ d
                        out[i] = r if v1 is None else r @ (v1 if v1.dtype == dtype else v1.to(dtype)).T
                    else:
                        batches[(tuple(d.shape), (v0 is None, v1 is None))].append(i)
                    continue
            out[i] = self.apply(blocks[i], states[i], d, inv, gradient=gradients[i])
        for (_, pattern), idx in batches.items():
            if len(idx) == 1 or all(pattern):
                for i in idx:
                    out[i] = self.apply(blocks[i], states[i], directions[i], inverses[i], gradient=gradients[i])
                continue
            dtype = directions[idx[0]].dtype
            m = torch.stack([directions[i] for i in idx])
            if m.dim() == 2:  # vectors: one factor
                v = torch.stack([inverses[i][0].to(dtype) for i in idx])  # type: ignore[index]
                res = torch.bmm(v, m.unsqueeze(-1)).squeeze(-1)
            else:
                res = m
                if not pattern[0]:
                    res = torch.bmm(torch.stack([inverses[i][0].to(dtype) for i in idx]), res)  # type: ignore[index]
                if not pattern[1]:
                    res = torch.bmm(res, torch.stack([inverses[i][1].to(dtype) for i in idx]).transpose(-1, -2))  # type: ignore[index]
            for i, r in zip(idx, res.unbind(0)):
                out[i] = r
        return out  # type: ignore[return-value]

