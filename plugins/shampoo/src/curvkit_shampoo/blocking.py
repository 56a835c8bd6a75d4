r"""Blocking of large parameters into tiles, each with its own Shampoo statistics and roots.

With ``block_size`` :math:`b`, every mode of a parameter's default curvkit view whose size
:math:`d` exceeds :math:`b` is cut into :math:`n = \lceil d / b \rceil` consecutive ranges of
:math:`r = \lceil d / n \rceil \le b` indices (:func:`tile_sizes`; the last range is shorter when
:math:`n r > d`, a *ragged* tile); modes of size :math:`\le b` stay whole (:math:`n = 1`). The
parameter becomes a grid of :math:`T = \prod_i n_i` tiles :math:`G_t`, and Shampoo runs on every
tile as if it were a parameter of its own (the blocking of Anil et al., "Scalable second order
optimization for deep learning", 2020):

.. math::
    S_{t,i} \leftarrow \beta S_{t,i} + (1 - \beta)\, G_{t,(i)} G_{t,(i)}^\top, \qquad
    V_{t,i} = (S_{t,i} + \epsilon I)^{-1/(2k)}, \qquad
    P_t = M_t \times_1 V_{t,1} \cdots \times_k V_{t,k},

with :math:`M_t` the tile of the momentum buffer and :math:`k` the order of the parameter's view
(the tile's own number of modes): every tile of a matrix gets
:math:`P_t = (L_t + \epsilon I)^{-1/4} M_t (R_t + \epsilon I)^{-1/4}`. A ``(1000, 784)`` weight
with ``block_size=256`` is a 4 x 4 grid of 250 x 196 tiles: 16 statistics of 250 x 250 and 16 of
196 x 196 instead of one 1000 x 1000 and one 784 x 784, so each root costs :math:`O(b^3)` time
and :math:`O(b^2)` memory.

Storage. A tiled block's view is its default view zero-padded to :math:`n_i r_i` per mode (the
block plan shows it, and the tiling in its rule), so that all tiles share one shape and every
tile's Grams and mode products run as one batched contraction (:func:`tile_grams`,
:func:`tile_products`). The estimator keeps the statistics of mode :math:`i` as one
``(T, r_i, r_i)`` tensor (tiles in row-major grid order, see :meth:`TiledLayout.tile_slices`) and
hands the optimizer one factor per (tile, mode), tile-major (entry :math:`t k + i` is
:math:`S_{t,i}`); the optimizer inverts them in batches of equal size with the root
:math:`-1/(2k)` of the block's order.

The padding is exact. The gradient is zero on padded entries, so a ragged tile's statistics have
zero rows and columns there; :math:`S_{t,i} + \epsilon I` is block diagonal (the ragged tile's
own damped statistic, and :math:`\epsilon I` on the padding), and so is its root, whose real
block is the root of the ragged tile alone. The momentum is zero on the padding too, so the
direction on the real entries is exactly the ragged tile's own :math:`P_t`; the direction on the
padded entries is set to zero (:meth:`TiledLayout.clean`) and never reaches the parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvkit import Block, Layout, default_block, view_shape_for
from curvkit.contractions import contract, mode_products

__all__ = ["TiledLayout", "kronecker_direction", "tile_grams", "tile_products", "tile_sizes", "tiled_block"]

_GRID = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tile_sizes(d: int, block_size: int) -> tuple[int, int]:
    r"""``(n, r)``: the number of tiles along a mode of size ``d`` and their size
    (:math:`n = \lceil d / b \rceil`, :math:`r = \lceil d / n \rceil \le b`, so the last tile holds
    :math:`d - (n - 1) r \ge 1` indices and the padding :math:`n r - d < n`)."""
    n = -(-d // block_size)
    return n, -(-d // n)


@dataclass(frozen=True)
class TiledLayout(Layout):
    """A parameter reshaped to ``base_shape``, zero-padded to ``grid[i] * tile_shape[i]`` per mode.

    Attributes:
        param_shape: the parameter's shape.
        base_shape: its default curvkit view (before tiling).
        grid: tiles per mode :math:`n_i`.
        tile_shape: the (padded) tile size per mode :math:`r_i`.
    """

    param_shape: tuple[int, ...]
    base_shape: tuple[int, ...]
    grid: tuple[int, ...]
    tile_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not len(self.base_shape) == len(self.grid) == len(self.tile_shape):
            raise ValueError(
                f"base_shape {self.base_shape}, grid {self.grid} and tile_shape {self.tile_shape} must have "
                f"one entry per mode"
            )
        for d, n, r in zip(self.base_shape, self.grid, self.tile_shape):
            if n < 1 or r < 1 or n * r < d or (n - 1) * r >= d:
                raise ValueError(
                    f"{n} tiles of size {r} do not tile a mode of size {d} (need n r >= d > (n - 1) r); "
                    f"build the layout with tile_sizes(d, block_size)"
                )

    @property
    def view_shape(self) -> tuple[int, ...]:
        """The padded view :math:`(n_1 r_1, \\ldots, n_k r_k)`."""
        return tuple(n * r for n, r in zip(self.grid, self.tile_shape))

    @property
    def split_shape(self) -> tuple[int, ...]:
        """The view with every mode split, :math:`(n_1, r_1, \\ldots, n_k, r_k)`."""
        return tuple(x for n, r in zip(self.grid, self.tile_shape) for x in (n, r))

    @property
    def num_tiles(self) -> int:
        """:math:`T = \\prod_i n_i`."""
        return math.prod(self.grid)

    @property
    def padded(self) -> bool:
        """Whether some mode is zero-padded (its last tile is ragged)."""
        return self.view_shape != self.base_shape

    @property
    def factor_sizes(self) -> tuple[int, ...]:
        """The size of each factor the estimator hands over, one per (tile, mode) in tile-major
        order (read by :func:`curvkit.testing.check_estimator`)."""
        return self.tile_shape * self.num_tiles

    def tile_slices(self) -> list[tuple[slice, ...]]:
        """Per tile, in row-major grid order, the slices of ``base_shape`` it covers (without
        padding; a ragged tile's slice is shorter than ``tile_shape``)."""
        ranges = [
            [slice(a * r, min((a + 1) * r, d)) for a in range(n)]
            for d, n, r in zip(self.base_shape, self.grid, self.tile_shape)
        ]
        out: list[tuple[slice, ...]] = [()]
        for mode in ranges:
            out = [s + (m,) for s in out for m in mode]
        return out

    def to_view(self, tensors: Sequence[Tensor]) -> Tensor:
        (t,) = tensors
        t = t.reshape(self.base_shape)
        if self.padded:
            pad: list[int] = []
            for d, p in zip(reversed(self.base_shape), reversed(self.view_shape)):
                pad.extend((0, p - d))
            t = F.pad(t, pad)
        return t

    def from_view(self, view: Tensor) -> list[Tensor]:
        t = view.reshape(self.view_shape)
        if self.padded:
            t = t[tuple(slice(0, d) for d in self.base_shape)]
        return [t.reshape(self.param_shape)]

    def clean(self, view: Tensor) -> Tensor:
        """``view`` with its padded entries set to zero (the view of what reaches the parameter)."""
        if not self.padded:
            return view
        return self.to_view(self.from_view(view))


def tiled_block(
    name: str, param: nn.Parameter, group: int, *, block_size: int, max_factor_dim: int | None
) -> Block:
    """One block for ``param``: its default curvkit block when no mode of the view exceeds
    ``block_size``, else a block with a :class:`TiledLayout` (modes over ``block_size`` tiled)."""
    base, rule = view_shape_for(param.shape)
    if all(d <= block_size for d in base):
        return default_block(name, param, group, max_factor_dim=max_factor_dim)
    grid, tile = zip(*(tile_sizes(d, block_size) if d > block_size else (1, d) for d in base))
    layout = TiledLayout(tuple(param.shape), tuple(base), tuple(grid), tuple(tile))
    factored = tuple(max_factor_dim is None or r <= max_factor_dim for r in tile)
    rule += f", {' x '.join(map(str, grid))} tiles of {' x '.join(map(str, tile))} (block_size={block_size}"
    rule += f", padded from {' x '.join(map(str, base))})" if layout.padded else ")"
    rule += " with statistics per tile"
    if not all(factored):
        rule += f", tile modes > max_factor_dim={max_factor_dim} unfactored"
    return Block(
        name=name, params=(param,), shape=layout.view_shape, factored=factored, layout=layout, group=group, rule=rule
    )


@lru_cache(maxsize=256)
def _gram_equation(k: int, mode: int) -> str:
    left = "".join(_GRID[i] + _LETTERS[i] for i in range(k))
    right = left.replace(_LETTERS[mode], _LETTERS[k])
    return f"{left},{right}->{_GRID[:k]}{_LETTERS[mode]}{_LETTERS[k]}"


@lru_cache(maxsize=256)
def _product_equation(k: int, modes: tuple[int, ...]) -> str:
    src = "".join(_GRID[i] + _LETTERS[i] for i in range(k))
    out = src
    operands = []
    for i in modes:
        new = _LETTERS[k + i]
        operands.append(f"{_GRID[:k]}{new}{_LETTERS[i]}")
        out = out.replace(_LETTERS[i], new)
    return ",".join(operands + [src]) + "->" + out


def tile_grams(layout: TiledLayout, view: Tensor, mode: int) -> Tensor:
    r"""Every tile's mode-``mode`` Gram :math:`G_{t,(i)} G_{t,(i)}^\top` as a ``(T, r, r)`` tensor
    (tiles in row-major grid order), from the padded ``view`` in one contraction."""
    k = len(layout.grid)
    split = view.reshape(layout.split_shape)
    r = layout.tile_shape[mode]
    return contract(_gram_equation(k, mode), split, split).reshape(layout.num_tiles, r, r)


def tile_products(layout: TiledLayout, view: Tensor, matrices: Sequence[Tensor | None]) -> Tensor:
    r"""Per tile :math:`M_t \times_1 V_{t,1} \cdots \times_k V_{t,k}` on the padded ``view``.

    Args:
        layout: the tiling.
        view: a padded view-shaped tensor.
        matrices: per mode a ``(T, r_i, r_i)`` stack (row-major grid order) or ``None`` (identity).
    """
    k = len(layout.grid)
    modes = tuple(i for i, m in enumerate(matrices) if m is not None)
    if not modes:
        return view
    mats = [matrices[i].reshape(*layout.grid, *matrices[i].shape[-2:]) for i in modes]
    out = contract(_product_equation(k, modes), *mats, view.reshape(layout.split_shape))
    return out.reshape(layout.view_shape)


def kronecker_direction(block: Block, direction: Tensor, inverses: Sequence[Tensor | None]) -> Tensor:
    r"""The Shampoo direction of any block: :math:`M \times_1 V_1 \cdots \times_k V_k` with one
    inverse per mode for a plain block, per tile with one inverse per (tile, mode), tile-major,
    for a :class:`TiledLayout` block (padded entries zero). ``None`` inverses are identities."""
    dtype = direction.dtype
    layout = block.layout
    if not isinstance(layout, TiledLayout):
        return mode_products(direction, [None if v is None else v.to(dtype) for v in inverses])
    k = block.order
    if len(inverses) != layout.num_tiles * k:
        raise ValueError(
            f"block {block.name!r} is tiled into {layout.num_tiles} tiles of {k} modes and needs "
            f"{layout.num_tiles * k} inverses (one per tile and mode), got {len(inverses)}"
        )
    stacks: list[Tensor | None] = []
    for i, r in enumerate(layout.tile_shape):
        per_tile = inverses[i::k]
        if all(v is None for v in per_tile):
            stacks.append(None)
            continue
        eye = torch.eye(r, dtype=dtype, device=direction.device)
        stacks.append(torch.stack([eye if v is None else v.to(dtype) for v in per_tile]))
    return layout.clean(tile_products(layout, direction, stacks))
