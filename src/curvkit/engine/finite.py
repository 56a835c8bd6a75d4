r"""Finiteness flags of lists of tensors, and selects by them, on the device (no host reads).

A tensor is finite when its Frobenius norm is: one fused ``torch._foreach_norm`` per dtype and
device gives every norm at once (on the CPU about as fast as any other reduction that catches
NaN and both infinities; ``_foreach_max`` alone misses a ``-inf`` among finite entries). A norm
overflows to ``inf`` only for entries beyond about ``1e19`` (float32), which count as faults. A
norm is never negative, so it is finite exactly when it is below ``inf`` (a NaN compares
``False``): one comparison, where ``torch.isfinite`` runs four kernels (``==``, ``abs``, ``!=``,
``&``).

The selects by a 0-d flag (:func:`zero_unless`, :func:`select`, :func:`zero_unless_`) give
``torch.where``'s exact bits by one mechanism: the float bits, read as integers of their width,
times the flag as 0 or 1 (1 keeps every bit: NaN payloads, infinities, :math:`-0.0`; 0 gives
:math:`+0.0`). ``torch.where`` with a 0-d condition runs an unvectorised loop on the CPU.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..matrix_functions import _BITS  # the integer type of each floating type's bits

__all__ = [
    "finite_flags", "finite_norms", "scalar_tensor", "select", "stack_flags", "zero_each_unless_", "zero_unless", "zero_unless_",
]

_SCALARS: dict[tuple[float, float, torch.dtype, torch.device], Tensor] = {}
_MAX_SCALARS = 256
#: From this many entries the integer product of one tensor's bits beats ``torch.where`` (measured
#: on this project's CPU, one thread: at 4,096 entries 11.9 against 12.6 us, at 131,072 35.7 against
#: 159.5 us; below, the two extra views cost more). :func:`zero_unless` has no threshold: its one
#: ``_foreach_mul`` for all tensors saves a call per tensor whatever their size.
_BITWISE_MIN = 4096


def finite_norms(tensors: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
    r"""``(flags, norms)``: one bool per tensor, ``True`` where every entry is finite, and the
    stacked norms :math:`\lVert t \rVert_F` when every tensor has the same dtype and device
    (``None`` otherwise: the flags are then gathered onto the first tensor's device).

    Written without in-place indexing, so that :func:`torch.compile` traces it in one graph.
    """
    if not tensors:
        return torch.ones(0, dtype=torch.bool), None
    buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.dtype, t.device), []).append(i)
    if len(buckets) == 1:
        norms = torch.stack(torch._foreach_norm(list(tensors)))
        return norms < math.inf, norms
    device = tensors[0].device
    flags: list[Tensor | None] = [None] * len(tensors)
    for idx in buckets.values():
        for i, n in zip(idx, torch._foreach_norm([tensors[i] for i in idx])):
            flags[i] = (n < math.inf).to(device)
    return torch.stack(flags), None  # type: ignore[arg-type]


def finite_flags(tensors: Sequence[Tensor]) -> Tensor:
    """One bool per tensor, ``True`` where every entry is finite (see :func:`finite_norms`)."""
    return finite_norms(tensors)[0]


def stack_flags(flags: Sequence[Tensor]) -> Tensor:
    """``torch.stack(flags)`` of 0-d tensors, without the copy where they are the entries, in
    order, of the 1-d tensor they were unbound from (a step's per-block flags, unbound for the
    blocks and gathered again for a batched update): that tensor itself is returned, so the
    caller must not modify the result in place."""
    if flags:
        base = flags[0]._base
        if (
            base is not None
            and base.dim() == 1
            and base.shape[0] == len(flags)
            and not torch.compiler.is_compiling()
        ):
            start, stride = base.storage_offset(), base.stride(0)
            if all(f._base is base and f.dim() == 0 and f.storage_offset() == start + i * stride for i, f in enumerate(flags)):
                return base
    return torch.stack(list(flags))


def scalar_tensor(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached 0-d tensor holding ``value`` exactly in ``dtype`` on ``device``: the constants of
    the masked updates (the zero of ``torch.where(ok, x, 0)``, a momentum factor), built once
    instead of once per call. Callers must not modify it. Under :func:`torch.compile` a fresh
    tensor is built (the compiled graph holds it as a constant)."""
    if torch.compiler.is_compiling():
        return torch.full((), value, dtype=dtype, device=device)
    key = (value, math.copysign(1.0, value), dtype, device)
    t = _SCALARS.get(key)
    if t is None:
        if len(_SCALARS) >= _MAX_SCALARS:  # e.g. a learning-rate schedule's decay factors
            _SCALARS.clear()
        t = _SCALARS[key] = torch.full((), value, dtype=dtype, device=device)
    return t


def zero_unless(flags: Tensor, tensors: Sequence[Tensor], *, flag_list: Sequence[Tensor] | None = None) -> list[Tensor]:
    r"""``[torch.where(flags[i], tensors[i], 0) for i]``, bitwise the same, without ``where``'s cost.

    ``torch.where`` with a 0-d condition runs an unvectorised loop on the CPU (about 1 ns per
    entry on one thread, 4.5x the integer product at 131,072 entries), and one call per tensor
    costs its dispatch for every small block. Instead the floating tensors are reinterpreted as
    integers of their width and multiplied, in one ``torch._foreach_mul`` per width, by their flag
    as an integer: 1 keeps every bit (NaN payloads, infinities, :math:`-0.0`), 0 gives all-zero
    bits, :math:`+0.0`. Other tensors (non-floating, flags on another device) and everything under
    :func:`torch.compile` (inductor fuses the select anyway) take ``torch.where``. The inputs are
    not modified.

    Args:
        flags: ``(n,)`` bool, one flag per tensor.
        tensors: ``n`` tensors.
        flag_list: ``flags.unbind(0)``, when the caller has it already.
    """
    return _zero_unless(flags, tensors, flag_list, in_place=False)


def zero_each_unless_(flags: Tensor, tensors: Sequence[Tensor], *, flag_list: Sequence[Tensor] | None = None) -> list[Tensor]:
    """:func:`zero_unless` in place, for tensors the caller owns (fresh results, its own buffers):
    one ``torch._foreach_mul_`` per width on their integer views, no new tensors, and the
    tensors themselves returned. A tensor that :func:`zero_unless` would give to ``torch.where``,
    a non-contiguous one (an expanded gradient shares memory between entries) and a second
    occurrence of one tensor (which may carry another flag) are replaced in the returned list
    by ``torch.where``'s result instead, and are not modified."""
    return _zero_unless(flags, tensors, flag_list, in_place=True)


def _zero_unless(flags: Tensor, tensors: Sequence[Tensor], oks: Sequence[Tensor] | None, *, in_place: bool) -> list[Tensor]:
    out: list[Tensor | None] = list(tensors) if in_place else [None] * len(tensors)
    widths: dict[torch.dtype, list[int]] = {}
    compiling = torch.compiler.is_compiling()
    seen: set[int] = set()
    for i, t in enumerate(tensors):
        bits = None if compiling else _BITS.get(t.dtype)
        # in place only where no two entries share memory (an expanded gradient) and the tensor
        # is listed once (autograd hands one gradient to both inputs of an addition)
        shared = in_place and (not t.is_contiguous() or id(t) in seen)
        if bits is None or t.device != flags.device or shared:
            if oks is None:
                oks = flags.unbind(0)
            out[i] = torch.where(oks[i], t, scalar_tensor(0.0, t.dtype, t.device))
        else:
            members = widths.get(bits)
            if members is None:
                members = widths[bits] = []
            members.append(i)
            if in_place:
                seen.add(id(t))
    for bits, members in widths.items():
        keep = flags.to(bits).unbind(0)  # 1: every bit kept; 0: none
        views = [tensors[i].view(bits) for i in members]
        if in_place:
            torch._foreach_mul_(views, [keep[i] for i in members])
            continue
        for i, p in zip(members, torch._foreach_mul(views, [keep[i] for i in members])):
            out[i] = p.view(tensors[i].dtype)
    return out  # type: ignore[return-value]


def _bitwise_dtype(flags: Tensor, tensor: Tensor) -> torch.dtype | None:
    """The integer dtype to select ``tensor``'s bits in, or ``None`` where ``torch.where`` is the
    better (or the only) way: non-floating or small tensors, flags on another device, and under
    :func:`torch.compile` (inductor fuses the select into a vectorised kernel anyway)."""
    bits = _BITS.get(tensor.dtype)
    if bits is None or tensor.numel() < _BITWISE_MIN or flags.device != tensor.device or torch.compiler.is_compiling():
        return None
    return bits


def select(ok: Tensor, yes: Tensor, no: Tensor | float) -> Tensor:
    r"""``torch.where(ok, yes, no)`` for a 0-d ``ok``, bitwise the same, at an integer product's
    cost (module docstring): ``no = 0.0`` multiplies ``yes``'s bits by the flag as 0 or 1; a tensor
    ``no`` of ``yes``'s shape and dtype takes :math:`n \oplus ((n \oplus y)\, k)` on the integer
    views, :math:`k` the flag (half ``where``'s time at a million entries). Anything else (a ``ok``
    with dimensions, small or non-floating tensors, broadcasting, another device, under
    :func:`torch.compile`) is ``torch.where`` itself. The inputs are not modified.
    """
    bits = _bitwise_dtype(ok, yes) if ok.dim() == 0 else None
    zero = not isinstance(no, Tensor) and no == 0.0 and math.copysign(1.0, no) > 0
    if bits is None or not (
        zero or (isinstance(no, Tensor) and no.dtype == yes.dtype and no.shape == yes.shape and no.device == yes.device)
    ):
        return torch.where(ok, yes, no)
    keep = ok.to(bits)
    if zero:
        return torch.mul(yes.view(bits), keep).view(yes.dtype)
    other = no.view(bits)  # type: ignore[union-attr]
    out = torch.bitwise_xor(other, yes.view(bits))
    return out.mul_(keep).bitwise_xor_(other).view(yes.dtype)


def zero_unless_(ok: Tensor, tensor: Tensor) -> Tensor:
    """In place: ``tensor`` as it is where the 0-d ``ok`` holds, :math:`+0.0` everywhere otherwise
    (the bits of ``torch.where(ok, tensor, 0)``, see :func:`zero_unless`); returns ``tensor``.

    For a tensor the caller owns (a fresh result, its own state): no allocation and, for a large
    floating tensor, one in-place integer product of its bits instead of a copy; smaller or other
    tensors take ``masked_fill_``.
    """
    bits = _bitwise_dtype(ok, tensor) if ok.dim() == 0 else None
    if bits is None:
        return tensor.masked_fill_(~ok, 0.0)
    tensor.view(bits).mul_(ok.to(bits))
    return tensor
