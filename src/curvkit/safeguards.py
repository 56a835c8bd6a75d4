r"""Numerical safeguards: batched inversion with retries, and per-block health counters.

Inversion policy, per factor: the inverter runs on a batch of same-size factors. If the batched
call raises (a decomposition that did not converge), each factor of the batch is retried alone in
the working dtype, so one bad factor never sends its batch-mates to float64. A factor whose result
is still not finite (or whose call raised) is retried alone in float64, then with 10x and 100x the
damping; if all of that fails the block keeps its last good inverse (or, before it has one, an
identity on that mode). Inputs that are themselves not finite go straight to the last good
inverse. A warm-started inverter (``Inverter.warm_start``) gets the previous eigenvectors in the
batched call and in the one-by-one retry; the float64 and extra-damping retries start cold. Every
fallback is counted in the block's health counters and warned about the first
time. The finiteness checks read one flag per factor on the host: inversion steps synchronise
(once per device for all batches, unless a fallback runs), ordinary steps do not. The optimizer
launches the batches (:func:`start_inversions`), reads their flags together with its own state
checks and health counters in that one read, then finishes (:func:`finish_inversions`).
"""

from __future__ import annotations

import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Collection, Sequence

import torch
from torch import Tensor

from .interfaces import Factor, Inverter

__all__ = [
    "CurvkitWarning", "HEALTH_COUNTERS", "INVERSION_COUNTERS", "InversionRequest", "PendingInversions",
    "finish_inversions", "invert_all", "new_health", "start_inversions", "warn_user",
]


#: The per-block counters of :meth:`curvkit.CurvatureOptimizer.health`.
HEALTH_COUNTERS = (
    "skipped_nonfinite_grad",  # steps whose update was skipped because the gradient was not finite
    "skipped_nonfinite_evidence",  # statistics updates skipped because the evidence was not finite
    "skipped_nonfinite_direction",  # updates skipped because the preconditioned direction was not finite
    "inverse_retry_float64",  # factors that needed the float64 retry
    "inverse_extra_damping",  # factors that needed more damping
    "inverse_kept_last",  # factors that kept their last good inverse (or identity)
    "statistics_restarted",  # statistics found non-finite at an inversion step and restarted
    "momentum_reset",  # momentum buffers found non-finite and reset to zero
    "missing_statistics",  # statistics steps on which step() found no new evidence (stale curvature)
    "missing_evidence",  # statistics updates in which a factored block got no evidence
    "partial_evidence",  # layer statistics from the last of several micro-batch forwards only
)

#: The counters of inversion fallbacks (counted by the rank that inverts a factor; shared with the
#: other ranks when inverses are divided among them).
INVERSION_COUNTERS = ("inverse_retry_float64", "inverse_extra_damping", "inverse_kept_last")


class CurvkitWarning(RuntimeWarning):
    """Warnings about numerical fallbacks and misuse (emitted once per kind and optimizer)."""


#: Module prefixes whose frames a warning skips (see :func:`warn_user`).
_LIBRARY_MODULES = ("curvkit", "torch.")


def warn_user(message: str) -> None:
    """Emit a :class:`CurvkitWarning` attributed to the caller's own code: the first frame on
    the stack outside curvkit (its plugins included) and torch (``optimizer.step``'s wrappers),
    so the warning names the line of the training loop that led to it, however deep the
    library's call chain is."""
    frame = sys._getframe(1)
    level = 2
    while frame is not None and frame.f_globals.get("__name__", "").startswith(_LIBRARY_MODULES):
        frame = frame.f_back
        level += 1
    warnings.warn(message, CurvkitWarning, stacklevel=level)


def new_health() -> dict[str, int]:
    """A fresh set of health counters, all zero."""
    return {name: 0 for name in HEALTH_COUNTERS}


@dataclass
class InversionRequest:
    """One factor to invert: which block/mode it belongs to and its previous inverse."""

    key: tuple[int, int]  # (block index, mode)
    factor: Factor
    order: int
    previous: Any  # the last inverse: a tensor, an EigenBasis, or None


def _finite_rows(batch: Tensor) -> list[bool]:
    return _row_flags(batch).tolist()


def _row_flags(batch: Tensor) -> Tensor:
    """One bool per leading row: every entry finite (on the device, no host read)."""
    return torch.isfinite(batch).flatten(1).all(dim=1)


def _row_sums_finite(batch: Tensor) -> Tensor:
    """One bool per leading row: its sum is finite, a fast test (one read, no temporaries) that
    implies every entry is finite; ``False`` may also mean a finite row whose sum overflowed,
    so a ``False`` is confirmed by :func:`_row_flags`."""
    return batch.flatten(1).sum(dim=1).isfinite()


def _call(inverter: Inverter, matrices: Tensor, damping: Tensor, order: Tensor, previous: Tensor | None = None) -> Any:
    """The inverter's result on a batch, or ``None`` if it raised."""
    try:
        if previous is not None:  # a warm-started inverter (Inverter.warm_start)
            return inverter.invert(matrices, damping=damping, order=order, previous=previous)  # type: ignore[call-arg]
        return inverter.invert(matrices, damping=damping, order=order)
    except (RuntimeError, torch.linalg.LinAlgError):
        return None


def _output_flags(out: Any, *, exact: bool = True) -> Tensor:
    rows = _row_flags if exact else _row_sums_finite
    if isinstance(out, tuple):  # an eigenbasis inverter: (vectors, values)
        return rows(out[0]) & rows(out[1])
    return rows(out)


def _rows(out: Any) -> Sequence[Any]:
    return list(zip(out[0], out[1])) if isinstance(out, tuple) else out


def _invert_batch(inverter: Inverter, matrices: Tensor, damping: Tensor, order: Tensor,
                  previous: Tensor | None = None) -> tuple[Any, list[bool]] | None:
    """Run the inverter on a batch; ``(results, finite per row)`` or ``None`` if it raised."""
    out = _call(inverter, matrices, damping, order, previous)
    if out is None:
        return None
    return _rows(out), _output_flags(out).tolist()


def _invert_one(inverter: Inverter, matrix: Tensor, damping: Tensor, order: int,
                previous: Tensor | None = None) -> Any:
    result = _invert_batch(
        inverter,
        matrix.unsqueeze(0),
        damping.reshape(1).to(matrix.dtype),
        torch.tensor([order], device=matrix.device),
        None if previous is None else previous.unsqueeze(0).to(matrix.dtype),
    )
    if result is None or not result[1][0]:
        return None
    return result[0][0]


def _dampings(reqs: Sequence[InversionRequest], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The damping of each request as one ``(b,)`` tensor (Python numbers in one transfer)."""
    values = [r.factor.damping for r in reqs]
    if all(not isinstance(v, Tensor) for v in values):
        return torch.tensor([float(v) for v in values], dtype=dtype, device=device)
    return torch.stack([torch.as_tensor(v, dtype=dtype, device=device).reshape(()) for v in values])


@dataclass
class PendingInversions:
    """Inversions launched by :func:`start_inversions`: every batch has run on the device; the
    finiteness of the results (``flags``, one device tensor per batch that did not raise) waits
    for the caller's host read, which may carry other values too (one read per step)."""

    batches: list[tuple[list[InversionRequest], Tensor, Tensor, Tensor | None, Any]]
    flags: list[Tensor | None]


def start_inversions(inverter: Inverter, requests: Sequence[InversionRequest]) -> PendingInversions:
    """Run the inverter on every batch of equal size, dtype and device (no host read).

    Returns the results with their row-sum finiteness flags on the device, for
    :func:`finish_inversions` once the flags have been read."""
    from .engine.health import index_tensor

    groups: dict[tuple[Any, ...], list[InversionRequest]] = defaultdict(list)
    for req in requests:
        m = req.factor.matrix
        groups[(m.shape[-1], m.dtype, m.device, _warm(inverter, req) is not None)].append(req)
    batches: list[tuple[list[InversionRequest], Tensor, Tensor, Tensor | None, Any]] = []
    flags: list[Tensor | None] = []
    for (_, dtype, device, warm), reqs in groups.items():
        previous = torch.stack([_warm(inverter, r).to(dtype) for r in reqs]) if warm else None  # type: ignore[union-attr]
        matrices = reqs[0].factor.matrix.unsqueeze(0) if len(reqs) == 1 else torch.stack([r.factor.matrix for r in reqs])
        damping = _dampings(reqs, dtype, device)
        order = index_tensor([r.order for r in reqs], device)
        out = _call(inverter, matrices, damping, order, previous)
        batches.append((reqs, matrices, damping, previous, out))
        flags.append(None if out is None else _output_flags(out, exact=False))
    return PendingInversions(batches, flags)


def finish_inversions(
    inverter: Inverter,
    pending: PendingInversions,
    flag_values: Sequence[Sequence[Any] | None],
    health: Any,
    *,
    leave_out: Collection[int] = (),
) -> dict[tuple[int, int], Any]:
    """The results of :func:`start_inversions`, given the host values of its ``flags``.

    Only when a result is not finite are that batch's inputs checked, to tell bad statistics
    (kept last inverse) from a failed decomposition (retried in float64, then with more damping).
    Requests of the blocks in ``leave_out`` (statistics the caller restarts) get no result and
    no retry.
    """
    results: dict[tuple[int, int], Any] = {}
    for (reqs, matrices, damping, previous, out), ok in zip(pending.batches, flag_values):
        ok = None if ok is None else [bool(v) for v in ok]
        if ok is not None and not all(ok):  # a row sum that is not finite: check its entries
            ok = _output_flags(out).tolist()
        if ok is not None and all(ok):
            for req, row in zip(reqs, _rows(out)):
                if req.key[0] not in leave_out:
                    results[req.key] = row
            continue
        if all(r.key[0] in leave_out for r in reqs):
            continue
        input_ok = _finite_rows(torch.cat([matrices.flatten(1), damping[:, None]], dim=1))
        if out is None:  # raised: one by one in the working dtype, no float64 yet
            outs = [
                _invert_one(inverter, r.factor.matrix, damping[i], r.order, None if previous is None else previous[i])
                if input_ok[i] and r.key[0] not in leave_out else None
                for i, r in enumerate(reqs)
            ]
            ok = [o is not None for o in outs]
        else:
            outs = _rows(out)
        for i, req in enumerate(reqs):
            if req.key[0] in leave_out:
                continue
            if ok[i] and input_ok[i]:
                results[req.key] = outs[i]
                continue
            results[req.key] = _recover(inverter, req, input_ok[i], health)
    return results


def invert_all(
    inverter: Inverter,
    requests: Sequence[InversionRequest],
    health: Any,
) -> dict[tuple[int, int], Any]:
    """Invert every requested factor, batching factors of equal size, dtype and device.

    :func:`start_inversions`, one host read per device for the finiteness of every result
    (:func:`~curvkit.engine.health.read_together`), then :func:`finish_inversions`.

    Args:
        inverter: the inverter part.
        requests: the factors to invert.
        health: a :class:`~curvkit.engine.health.HealthMonitor` (``count`` and ``warn_once``).

    Returns:
        ``{(block, mode): inverse}``; an inverse is a tensor, a ``(vectors, values)`` pair for
        eigenbasis inverters, the previous inverse, or ``None`` (identity on that mode).
    """
    from .engine.health import read_together

    pending = start_inversions(inverter, requests)
    return finish_inversions(inverter, pending, read_together(pending.flags), health)


def _warm(inverter: Inverter, req: InversionRequest) -> Tensor | None:
    """The previous eigenvectors of a warm-started inverter's factor, if it has a real one (the
    identity placeholder of a fresh state, version 0, does not count: its first refresh is cold)."""
    from .operators import EigenBasis

    prev = req.previous
    if not inverter.warm_start or not isinstance(prev, EigenBasis) or prev.version <= 0:
        return None
    if tuple(prev.vectors.shape) != tuple(req.factor.matrix.shape):
        return None
    return prev.vectors


def _recover(inverter: Inverter, req: InversionRequest, input_ok: bool, health: Any) -> Any:
    block = req.key[0]
    matrix, dtype = req.factor.matrix, req.factor.matrix.dtype
    damping = torch.as_tensor(req.factor.damping, dtype=torch.float64, device=matrix.device).reshape(())
    if input_ok:
        m64 = matrix.to(torch.float64)
        health.count(block, "inverse_retry_float64")
        health.warn_once("inverse_retry_float64", "an inversion failed or was not finite; retried in float64")
        out = _invert_one(inverter, m64, damping, req.order)
        if out is not None:
            return _cast(out, dtype)
        health.count(block, "inverse_extra_damping")
        health.warn_once("inverse_extra_damping", "an inversion failed in float64; retried with more damping")
        for factor in (10.0, 100.0):
            out = _invert_one(inverter, m64, damping * factor, req.order)
            if out is not None:
                return _cast(out, dtype)
    health.count(block, "inverse_kept_last")
    health.warn_once(
        "inverse_kept_last",
        "a curvature factor could not be inverted (non-finite statistics or failed decomposition); "
        "keeping the block's last good inverse",
    )
    return req.previous


def _cast(out: Any, dtype: torch.dtype) -> Any:
    return tuple(t.to(dtype) for t in out) if isinstance(out, tuple) else out.to(dtype)
