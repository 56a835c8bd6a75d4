r"""Blocking of large modes: split every mode larger than ``block_size`` into chunks.

A mode of size :math:`d > b` (``block_size``) is split into :math:`n = \lceil d / b \rceil` chunks
of equal size :math:`r = \lceil d / n \rceil \le b`, zero-padding the mode to :math:`n r` when
:math:`r` does not divide :math:`d`. In the block's view that mode becomes two modes
``(n, r)``: the chunk index (no factor: identity) and the position inside a chunk (a dense
:math:`r \times r` factor). So a ``(1000, 784)`` weight with ``block_size=256`` is viewed as
``(4, 250, 4, 196)`` and preconditioned by

.. math:: I_4 \otimes L^{-1/2k} \otimes I_4 \otimes R^{-1/2k},

where :math:`L = \sum_a G_a G_a^\top` sums the Gram matrices of the row chunks :math:`G_a` (the
statistics of a chunk mode are shared by its chunks), and :math:`k` is the order of the view
(4 here), as for every curvkit block. Factors are then never larger than ``block_size``, which
bounds the cost of each root at :math:`O(b^3)` and its memory at :math:`O(b^2)`.

The padded entries of a gradient are zero, so they add nothing to the statistics; the direction
on them is dropped when the view is mapped back to the parameter.

(Production Shampoo, Anil et al. 2020, instead gives every *tile* of a parameter its own
statistics; that needs blocks that cover part of a parameter, which curvkit's block plan does
not have: one block covers whole parameters.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from curvkit import Block, Layout, view_shape_for

__all__ = ["ChunkedLayout", "chunk_sizes", "chunked_block"]


def chunk_sizes(d: int, block_size: int) -> tuple[int, int]:
    r"""``(n, r)``: the number of chunks and the chunk size of a mode of size ``d``
    (:math:`n = \lceil d / b \rceil`, :math:`r = \lceil d / n \rceil`, so :math:`n r - d < n`)."""
    n = -(-d // block_size)
    return n, -(-d // n)


@dataclass(frozen=True)
class ChunkedLayout(Layout):
    """A parameter reshaped to ``base_shape``, modes zero-padded and split as ``chunks`` says.

    Attributes:
        param_shape: the parameter's shape.
        base_shape: its default curvkit view (before splitting).
        chunks: per mode of ``base_shape``, ``(n, r)`` when it is split, else ``None``.
    """

    param_shape: tuple[int, ...]
    base_shape: tuple[int, ...]
    chunks: tuple[tuple[int, int] | None, ...]

    @property
    def padded_shape(self) -> tuple[int, ...]:
        return tuple(d if c is None else c[0] * c[1] for d, c in zip(self.base_shape, self.chunks))

    @property
    def view_shape(self) -> tuple[int, ...]:
        out: list[int] = []
        for d, c in zip(self.base_shape, self.chunks):
            out.extend((d,) if c is None else c)
        return tuple(out)

    @property
    def padded(self) -> bool:
        return self.padded_shape != self.base_shape

    def to_view(self, tensors: Sequence[Tensor]) -> Tensor:
        (t,) = tensors
        t = t.reshape(self.base_shape)
        if self.padded:
            pad: list[int] = []
            for d, p in zip(reversed(self.base_shape), reversed(self.padded_shape)):
                pad.extend((0, p - d))
            t = F.pad(t, pad)
        return t.reshape(self.view_shape)

    def from_view(self, view: Tensor) -> list[Tensor]:
        t = view.reshape(self.padded_shape)
        if self.padded:
            t = t[tuple(slice(0, d) for d in self.base_shape)]
        return [t.reshape(self.param_shape)]

    def clean(self, view: Tensor) -> Tensor:
        """``view`` with its padded entries set to zero (the view of what reaches the parameter)."""
        if not self.padded:
            return view
        return self.to_view(self.from_view(view))


def chunked_block(
    name: str, param: nn.Parameter, group: int, *, block_size: int, max_factor_dim: int | None
) -> Block:
    """One block for ``param`` with the default curvkit view, modes over ``block_size`` split."""
    base, rule = view_shape_for(param.shape)
    chunks = tuple(chunk_sizes(d, block_size) if d > block_size else None for d in base)
    shape: list[int] = []
    factored: list[bool] = []
    too_big = False
    for d, c in zip(base, chunks):
        size = d if c is None else c[1]
        fits = max_factor_dim is None or size <= max_factor_dim
        too_big = too_big or not fits
        if c is None:
            shape.append(d)
            factored.append(fits)
        else:
            shape.extend(c)
            factored.extend((False, fits))
    if any(c is not None for c in chunks):
        rule += f", modes > block_size={block_size} split into (chunks, size)"
    if too_big:
        rule += f", modes > max_factor_dim={max_factor_dim} unfactored"
    return Block(
        name=name,
        params=(param,),
        shape=tuple(shape),
        factored=tuple(factored),
        layout=ChunkedLayout(tuple(param.shape), tuple(base), chunks),
        group=group,
        rule=rule,
    )
