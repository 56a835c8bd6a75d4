r"""Blocks: which parameters are preconditioned together, and the tensor view they take.

A :class:`Block` is the unit the three parts work on. It has a *view shape*
:math:`d_1 \times \cdots \times d_k` (one Kronecker factor per mode) and a *layout* that maps the
block's parameters into that view and back.

Default view rule (:func:`view_shape_for`), one block per parameter:

==============================  ===========================================
parameter shape                 view
==============================  ===========================================
``()`` (0-d)                    ``(1,)``: one 1 x 1 factor
``(d,)`` (bias, norm scale)     ``(d,)``: one full d x d factor
``(out, in)``                   ``(out, in)``
``(out, in, kh, kw)`` (conv)    ``(out, in, kh*kw)``
``(d1, d2, d3)``                ``(d1, d2, d3)``
rank r >= 4                     ``(d1, d2, d3*...*dr)`` (conv weights generalise)
==============================  ===========================================

after which modes of size 1 are dropped (a 1 x 1 factor only rescales; a ``(out, in, 1, 1)``
convolution is preconditioned as the ``(out, in)`` matrix it is), keeping at least one mode.
A mode larger than ``max_factor_dim`` gets no dense factor: it is marked *unfactored* and the
preconditioner leaves that mode as it is (identity).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

import torch
from einops import rearrange
from torch import Tensor

__all__ = [
    "describe_kronecker",
    "Block",
    "BlockPlan",
    "HomogeneousLayout",
    "Layout",
    "ReshapeLayout",
    "FALLBACK_MOMENTUM",
    "default_block",
    "fallback_block",
    "layer_block",
    "view_shape_for",
]

#: The ``kind`` of blocks that take the plain momentum direction (no curvature).
FALLBACK_MOMENTUM = "fallback: momentum"


def view_shape_for(shape: Sequence[int]) -> tuple[tuple[int, ...], str]:
    """The default view of a parameter shape and a short description of the rule used."""
    shape = tuple(int(s) for s in shape)
    rank = len(shape)
    if rank == 0:
        view, rule = (1,), "scalar as (1,)"
    elif rank == 1:
        view, rule = shape, "vector"
    elif rank == 2:
        view, rule = shape, "matrix (out, in)"
    elif rank == 3:
        view, rule = shape, "3-tensor"
    else:
        view, rule = (shape[0], shape[1], math.prod(shape[2:])), "conv (out, in, prod(kernel))"
    squeezed = tuple(d for d in view if d != 1) or (1,)
    if squeezed != view:
        rule += ", size-1 modes dropped"
    return squeezed, rule


class Layout(ABC):
    """Maps a block's parameters (or their gradients) to the view and back."""

    @abstractmethod
    def to_view(self, tensors: Sequence[Tensor]) -> Tensor:
        """Parameters (or gradients, buffers) of the block -> one view-shaped tensor."""

    @abstractmethod
    def from_view(self, view: Tensor) -> list[Tensor]:
        """A view-shaped tensor -> one tensor per parameter, in ``params`` order."""


@dataclass(frozen=True)
class ReshapeLayout(Layout):
    """A single parameter viewed by reshaping (no copy for contiguous tensors)."""

    param_shape: tuple[int, ...]
    view_shape: tuple[int, ...]

    def to_view(self, tensors: Sequence[Tensor]) -> Tensor:
        (t,) = tensors
        # the common case (a matrix or vector viewed as itself) skips the reshape call: comparing
        # shapes costs a tenth of it, and either result aliases the same storage
        return t if t.shape == self.view_shape else t.reshape(self.view_shape)

    def from_view(self, view: Tensor) -> list[Tensor]:
        return [view if view.shape == self.param_shape else view.reshape(self.param_shape)]


@dataclass(frozen=True)
class HomogeneousLayout(Layout):
    r"""A layer's weight and optional bias as one matrix ``(out, in_flat [+ 1])``.

    The weight (``(out, ...)``) is flattened to ``(out, in_flat)`` and the bias, when present,
    appended as the last column (the homogeneous coordinate used by KFAC and K-BFGS).
    """

    weight_shape: tuple[int, ...]
    has_bias: bool

    def to_view(self, tensors: Sequence[Tensor]) -> Tensor:
        weight = rearrange(tensors[0], "o ... -> o (...)")
        if not self.has_bias:
            return weight
        return torch.cat([weight, tensors[1].unsqueeze(1)], dim=1)

    def from_view(self, view: Tensor) -> list[Tensor]:
        if not self.has_bias:
            return [view.reshape(self.weight_shape)]
        return [view[:, :-1].reshape(self.weight_shape), view[:, -1]]


@dataclass(eq=False)
class Block:
    """One preconditioning block.

    Attributes:
        name: a readable name (parameter or module name).
        params: the parameters the block covers, in layout order.
        shape: the view shape, one entry per mode.
        factored: per mode, whether it gets a dense factor (``False`` = identity).
        layout: maps parameters to the view and back.
        group: index of the param group the block's parameters belong to.
        rule: how the view was chosen (shown in the block plan).
        kind: what the preconditioner does with it (``"kronecker"`` or a fallback name).
        module: the layer, for layer-based estimators.
    """

    name: str
    params: tuple[torch.nn.Parameter, ...]
    shape: tuple[int, ...]
    factored: tuple[bool, ...]
    layout: Layout
    group: int
    rule: str = ""
    kind: str = "kronecker"
    module: torch.nn.Module | None = None

    @property
    def order(self) -> int:
        """The number of modes ``k`` of the view."""
        return len(self.shape)

    @property
    def numel(self) -> int:
        """The number of entries of the view, :math:`\\prod_i d_i`."""
        return math.prod(self.shape)

    def to_view(self, tensors: Sequence[Tensor]) -> Tensor:
        """The block's parameters (or gradients, buffers) as one view-shaped tensor."""
        return self.layout.to_view(tensors)

    def from_view(self, view: Tensor) -> list[Tensor]:
        """A view-shaped tensor as one tensor per parameter, in ``params`` order."""
        return self.layout.from_view(view)

    def describe(self) -> dict[str, object]:
        """One row of the block plan (``(id)`` in the view marks an unfactored mode)."""
        modes = " x ".join(f"{d}{'' if f else '(id)'}" for d, f in zip(self.shape, self.factored))
        return {
            "block": self.name,
            "params": ", ".join(str(tuple(p.shape)) for p in self.params),
            "view": modes,
            "rule": self.rule,
            "kind": self.kind,
            "group": self.group,
        }


def default_block(
    name: str, param: torch.nn.Parameter, group: int, *, max_factor_dim: int | None
) -> Block:
    """One block for one parameter with the default view rule (see module docstring)."""
    shape, rule = view_shape_for(param.shape)
    factored = tuple(max_factor_dim is None or d <= max_factor_dim for d in shape)
    if not all(factored):
        rule += f", modes > max_factor_dim={max_factor_dim} unfactored"
    return Block(
        name=name,
        params=(param,),
        shape=shape,
        factored=factored,
        layout=ReshapeLayout(tuple(param.shape), shape),
        group=group,
        rule=rule,
    )


def fallback_block(
    name: str, param: torch.nn.Parameter, group: int, *, reason: str, max_factor_dim: int | None = None
) -> Block:
    """A block with every mode unfactored, for parameters a method has no curvature model of.

    The preconditioner leaves every mode as it is, so the block takes the plain momentum direction;
    its ``kind`` is :data:`FALLBACK_MOMENTUM` and its ``rule`` says ``reason`` (shown in the plan).
    """
    block = default_block(name, param, group, max_factor_dim=max_factor_dim)
    block.factored = tuple(False for _ in block.shape)
    block.kind = FALLBACK_MOMENTUM
    block.rule = f"{reason}: plain momentum"
    return block


def layer_block(
    name: str,
    module: torch.nn.Module,
    *,
    weight: torch.nn.Parameter,
    bias: torch.nn.Parameter | None,
    group: int,
    max_factor_dim: int | None,
    rule: str,
) -> Block:
    """One ``(out, in_flat [+ 1])`` block for a layer's weight and optional bias.

    The weight ``(out, ...)`` is flattened to ``(out, in_flat)`` and the bias, when given, is the
    homogeneous last column (:class:`HomogeneousLayout`), as KFAC and K-BFGS model a layer.
    Modes larger than ``max_factor_dim`` are unfactored (and the rule says so).
    """
    has_bias = bias is not None
    shape = (int(weight.shape[0]), math.prod(weight.shape[1:]) + int(has_bias))
    factored = tuple(max_factor_dim is None or d <= max_factor_dim for d in shape)
    if not all(factored):
        rule += f", modes > max_factor_dim={max_factor_dim} unfactored"
    return Block(
        name=name,
        params=(weight, bias) if has_bias else (weight,),
        shape=shape,
        factored=factored,
        layout=HomogeneousLayout(tuple(weight.shape), has_bias),
        group=group,
        rule=rule,
        kind="kronecker",
        module=module,
    )


def describe_kronecker(block: Block) -> str:
    """One line for a block preconditioned by one matrix per mode: ``"Kronecker 2 modes: 64x64,
    33x33"`` (``"identity (d)"`` on an unfactored mode), or ``"momentum (unfactored)"`` when no mode
    is factored."""
    if not any(block.factored):
        return "momentum (unfactored)"
    modes = ", ".join(f"{d}x{d}" if f else f"identity ({d})" for d, f in zip(block.shape, block.factored))
    count = sum(block.factored)
    which = f"{count} mode{'s' if count > 1 else ''}" if count == block.order else f"{count} of {block.order} modes"
    return f"Kronecker {which}: {modes}"


@dataclass
class BlockPlan:
    """The list of blocks an optimizer built, printable as a table.

    Attributes:
        blocks: the blocks, in plan order.
        descriptions: per block, what the method does to it (the preconditioner's
            ``describe``); shown as the ``preconditioning`` column when given.
    """

    blocks: list[Block] = field(default_factory=list)
    descriptions: list[str] | None = None

    def __iter__(self):
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def rows(self) -> list[dict[str, object]]:
        """One :meth:`Block.describe` row per block (plus ``preconditioning`` when known)."""
        rows = [b.describe() for b in self.blocks]
        if self.descriptions is not None:
            for row, text in zip(rows, self.descriptions):
                row["preconditioning"] = text
        return rows

    def coverage(self) -> float:
        """Share of the parameters' entries that get curvature (a factored mode in their block)."""
        total = sum(p.numel() for b in self.blocks for p in b.params)
        covered = sum(p.numel() for b in self.blocks if any(b.factored) for p in b.params)
        return covered / total if total else 1.0

    def __str__(self) -> str:
        rows = self.rows()
        if not rows:
            return "(no blocks)"
        cols = list(rows[0])
        widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
        line = "  ".join(c.ljust(widths[c]) for c in cols).rstrip()
        out = [line, "  ".join("-" * widths[c] for c in cols)]
        out += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols).rstrip() for r in rows]
        out.append(f"curvature coverage: {100 * self.coverage():.1f}% of parameter entries")
        return "\n".join(out)
