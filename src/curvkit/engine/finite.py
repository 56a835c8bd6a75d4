r"""Finiteness flags of lists of tensors, on the device (no host reads).

A tensor is finite when its Frobenius norm is: one fused ``torch._foreach_norm`` per dtype and
device gives every norm at once (on the CPU about as fast as any other reduction that catches
NaN and both infinities; ``_foreach_max`` alone misses a ``-inf`` among finite entries). A norm
overflows to ``inf`` only for entries beyond about ``1e19`` (float32), which count as faults.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["finite_flags", "finite_norms", "scalar_tensor"]

_SCALARS: dict[tuple[float, float, torch.dtype, torch.device], Tensor] = {}
_MAX_SCALARS = 256


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
        return torch.isfinite(norms), norms
    device = tensors[0].device
    flags: list[Tensor | None] = [None] * len(tensors)
    for idx in buckets.values():
        for i, n in zip(idx, torch._foreach_norm([tensors[i] for i in idx])):
            flags[i] = torch.isfinite(n).to(device)
    return torch.stack(flags), None  # type: ignore[arg-type]


def finite_flags(tensors: Sequence[Tensor]) -> Tensor:
    """One bool per tensor, ``True`` where every entry is finite (see :func:`finite_norms`)."""
    return finite_norms(tensors)[0]


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
