r"""Conformance check of :class:`~curvkit.Preconditioner` parts."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn

from ..blocks import Block, ReshapeLayout
from ..interfaces import Preconditioner
from ._common import assert_finite, fail, random_psd, roundtrip

__all__ = ["check_preconditioner", "make_block"]


def make_block(shape: Sequence[int], *, factored: Sequence[bool] | None = None,
               dtype: torch.dtype = torch.float64, name: str = "block") -> Block:
    """A single-parameter block with view ``shape`` (for driving parts outside an optimizer)."""
    shape = tuple(int(d) for d in shape)
    param = nn.Parameter(torch.zeros(shape, dtype=dtype))
    return Block(
        name=name,
        params=(param,),
        shape=shape,
        factored=tuple(factored) if factored is not None else (True,) * len(shape),
        layout=ReshapeLayout(shape, shape),
        group=0,
        rule="conformance test block",
    )


def _apply(pre: Preconditioner, block: Block, state: dict, direction: Tensor,
           inverses: list[Tensor | None] | None, gradient: Tensor, who: str, what: str) -> Tensor:
    saved_dir, saved_grad = direction.clone(), gradient.clone()
    saved_inv = None if inverses is None else [None if v is None else v.clone() for v in inverses]
    out = pre.apply(block, state, direction, inverses, gradient=gradient)
    if not torch.equal(direction, saved_dir) or not torch.equal(gradient, saved_grad):
        fail(who, f"modified the direction or gradient in place ({what}); the direction is the "
                  f"optimizer's momentum buffer and must be left as it is")
    if inverses is not None:
        for v, s in zip(inverses, saved_inv):
            if v is not None and not torch.equal(v, s):
                fail(who, f"modified an inverse factor in place ({what})")
    if not isinstance(out, Tensor):
        fail(who, f"apply must return a Tensor, got {type(out).__name__} ({what})")
    if tuple(out.shape) != tuple(direction.shape) or out.dtype != direction.dtype:
        fail(who, f"returned shape/dtype {tuple(out.shape)}/{out.dtype} for a direction of "
                  f"{tuple(direction.shape)}/{direction.dtype} ({what})")
    assert_finite(who, f"direction ({what})", out)
    return out


def check_preconditioner(
    preconditioner: Preconditioner,
    *,
    shapes: Sequence[Sequence[int]] = ((5,), (4, 3), (3, 2, 4)),
    dtype: torch.dtype = torch.float64,
    steps: int = 3,
    seed: int = 0,
) -> None:
    r"""Check that a preconditioner honours the :class:`~curvkit.Preconditioner` contract.

    For each view shape in ``shapes`` (ranks 1 to 3 by default) it builds a block, calls
    ``init_state`` and then ``apply`` ``steps`` times with fresh random directions and gradients,
    once with ``inverses=None`` (before any curvature exists), then with one SPD matrix per mode,
    and then with the last mode unfactored (``None``). It verifies:

    * the result is a finite tensor with the direction's shape and dtype, also for
      ``inverses=None`` (the fallback) and for zero directions and gradients;
    * the direction, gradient and inverses are not modified (the direction is the optimizer's
      momentum buffer);
    * ``init_state`` returns a dict, and the per-block state survives
      ``torch.save`` / ``torch.load(weights_only=True)``: the next ``apply`` on the reloaded state
      equals the next ``apply`` on the original, bit for bit.

    Args:
        preconditioner: the part to check.
        shapes: block view shapes to try.
        dtype: floating dtype of directions and inverses.
        steps: ``apply`` calls with curvature before the state round trip.
        seed: seed of the random inputs.

    Raises:
        AssertionError: (:class:`~curvkit.testing.ConformanceError`) naming the failed property.
    """
    who = f"preconditioner {getattr(preconditioner, 'name', '') or type(preconditioner).__name__}"
    if not isinstance(preconditioner, Preconditioner):
        fail(who, f"must be a curvkit.Preconditioner, got {type(preconditioner).__name__}")
    gen = torch.Generator().manual_seed(seed)
    for shape in shapes:
        for unfactored_last in (False, True):
            factored = [True] * len(shape)
            if unfactored_last:
                factored[-1] = False
            block = make_block(shape, factored=factored, dtype=dtype)
            tag = f"view {tuple(shape)}" + (", last mode unfactored" if unfactored_last else "")
            state = preconditioner.init_state(block)
            if not isinstance(state, dict):
                fail(who, f"init_state must return a dict, got {type(state).__name__}")

            def rand() -> Tensor:
                return torch.randn(tuple(shape), dtype=dtype, generator=gen)

            zero = torch.zeros(tuple(shape), dtype=dtype)
            _apply(preconditioner, block, state, rand(), None, rand(), who, f"{tag}, inverses=None")
            _apply(preconditioner, block, state, zero, None, zero.clone(), who, f"{tag}, zero direction, no inverses")
            for _ in range(steps):
                inverses = [random_psd(d, dtype=dtype, generator=gen) + torch.eye(d, dtype=dtype) if f else None
                            for d, f in zip(shape, factored)]
                _apply(preconditioner, block, state, rand(), inverses, rand(), who, tag)
            _apply(preconditioner, block, state, zero, inverses, zero.clone(), who, f"{tag}, zero direction")
            try:
                loaded = roundtrip(state)
            except Exception as exc:  # noqa: BLE001 - report any failure to save/load
                fail(who, f"per-block state does not survive torch.save/torch.load(weights_only=True) "
                          f"({tag}): {type(exc).__name__}: {exc}")
            kept = copy.deepcopy(state)
            direction, gradient = rand(), rand()
            a = _apply(preconditioner, block, kept, direction, inverses, gradient, who, f"{tag}, after reload")
            b = _apply(preconditioner, block, loaded, direction, inverses, gradient, who, f"{tag}, after reload")
            if not torch.equal(a, b):
                fail(who, f"the direction after a state round trip through torch.save/torch.load differs "
                          f"from the one without it ({tag})")
