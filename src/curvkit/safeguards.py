r"""Numerical safeguards: batched inversion with retries, and per-block health counters.

Inversion policy, per factor: the inverter runs on a batch of same-size factors; any factor whose
result is not finite (or whose batch raised) is retried alone in float64, then with 10x and 100x
the damping; if all of that fails the block keeps its last good inverse (or, before it has one, an
identity on that mode). Inputs that are themselves not finite go straight to the last good inverse.
Every fallback is counted in the block's health counters and warned about the first time.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from .interfaces import Factor, Inverter

__all__ = ["CurvkitWarning", "HEALTH_COUNTERS", "InversionRequest", "invert_all", "new_health"]

#: The per-block counters of :meth:`curvkit.CurvatureOptimizer.health`.
HEALTH_COUNTERS = (
    "skipped_nonfinite_grad",  # steps whose update was skipped because the gradient was not finite
    "skipped_nonfinite_evidence",  # statistics updates skipped because the evidence was not finite
    "skipped_nonfinite_direction",  # updates skipped because the preconditioned direction was not finite
    "inverse_retry_float64",  # factors that needed the float64 retry
    "inverse_extra_damping",  # factors that needed more damping
    "inverse_kept_last",  # factors that kept their last good inverse (or identity)
)


class CurvkitWarning(RuntimeWarning):
    """Warnings about numerical fallbacks and misuse (emitted once per kind and optimizer)."""


def new_health() -> dict[str, int]:
    """A fresh set of health counters, all zero."""
    return {name: 0 for name in HEALTH_COUNTERS}


@dataclass
class InversionRequest:
    """One factor to invert: which block/mode it belongs to and its previous inverse."""

    key: tuple[int, int]  # (block index, mode)
    factor: Factor
    order: int
    previous: Tensor | None


def _finite_rows(batch: Tensor) -> list[bool]:
    return torch.isfinite(batch).flatten(1).all(dim=1).tolist()


def _invert_one(inverter: Inverter, matrix: Tensor, damping: Tensor, order: int) -> Tensor | None:
    try:
        out = inverter.invert(
            matrix.unsqueeze(0),
            damping=damping.reshape(1),
            order=torch.tensor([order], device=matrix.device),
        )
    except (RuntimeError, torch.linalg.LinAlgError):
        return None
    if isinstance(out, tuple):  # an eigenbasis: (vectors, values)
        one = (out[0][0], out[1][0])
        return one if all(bool(torch.isfinite(t).all()) for t in one) else None
    out = out[0] if out.dim() == 3 else out
    return out if bool(torch.isfinite(out).all()) else None


def invert_all(
    inverter: Inverter,
    requests: Sequence[InversionRequest],
    health: dict[int, dict[str, int]],
    warned: set[str],
) -> dict[tuple[int, int], Tensor | None]:
    """Invert every requested factor, batching factors of equal size, dtype and device.

    Returns ``{(block, mode): inverse or None}``; ``None`` means identity on that mode.
    """
    groups: dict[tuple[Any, ...], list[InversionRequest]] = defaultdict(list)
    for req in requests:
        m = req.factor.matrix
        groups[(m.shape[-1], m.dtype, m.device)].append(req)
    results: dict[tuple[int, int], Tensor | None] = {}
    for (_, dtype, device), reqs in groups.items():
        matrices = torch.stack([r.factor.matrix for r in reqs])
        damping = torch.stack(
            [torch.as_tensor(r.factor.damping, dtype=dtype, device=device).reshape(()) for r in reqs]
        )
        order = torch.tensor([r.order for r in reqs], device=device)
        input_ok = _finite_rows(torch.cat([matrices.flatten(1), damping[:, None]], dim=1))
        try:
            out = inverter.invert(matrices, damping=damping, order=order)
            if isinstance(out, tuple):  # an eigenbasis inverter: (vectors, values)
                ok = [a and b for a, b in zip(_finite_rows(out[0]), _finite_rows(out[1]))]
                out = list(zip(out[0], out[1]))
            else:
                ok = _finite_rows(out)
        except (RuntimeError, torch.linalg.LinAlgError):
            out, ok = None, [False] * len(reqs)
        for i, req in enumerate(reqs):
            if ok[i] and input_ok[i]:
                results[req.key] = out[i]
                continue
            results[req.key] = _recover(inverter, req, input_ok[i], health, warned)
    return results


def _recover(
    inverter: Inverter,
    req: InversionRequest,
    input_ok: bool,
    health: dict[int, dict[str, int]],
    warned: set[str],
) -> Tensor | None:
    counters = health[req.key[0]]
    matrix, dtype = req.factor.matrix, req.factor.matrix.dtype
    damping = torch.as_tensor(req.factor.damping, dtype=torch.float64, device=matrix.device).reshape(())
    if input_ok:
        m64 = matrix.to(torch.float64)
        counters["inverse_retry_float64"] += 1
        _warn_once(warned, "float64", "an inversion failed or was not finite; retried in float64")
        out = _invert_one(inverter, m64, damping, req.order)
        if out is not None:
            return _cast(out, dtype)
        counters["inverse_extra_damping"] += 1
        _warn_once(warned, "damping", "an inversion failed in float64; retried with more damping")
        for factor in (10.0, 100.0):
            out = _invert_one(inverter, m64, damping * factor, req.order)
            if out is not None:
                return _cast(out, dtype)
    counters["inverse_kept_last"] += 1
    _warn_once(
        warned,
        "kept",
        "a curvature factor could not be inverted (non-finite statistics or failed decomposition); "
        "keeping the block's last good inverse",
    )
    return req.previous


def _cast(out: Any, dtype: torch.dtype) -> Any:
    return tuple(t.to(dtype) for t in out) if isinstance(out, tuple) else out.to(dtype)


def _warn_once(warned: set[str], key: str, message: str) -> None:
    if key not in warned:
        warned.add(key)
        warnings.warn(f"curvkit: {message} (see opt.health())", CurvkitWarning, stacklevel=4)
