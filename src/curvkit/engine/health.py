r"""Health counters: every numerical fallback and misuse, counted per block.

Faults found on the device during ordinary steps (non-finite gradients, evidence, directions)
are counted in integer tensors on the device by masked additions, so a steady-state step never
reads a tensor value on the host. The counts are read -- and a warning is emitted once per kind
of fault -- only at *sync points*: :meth:`HealthMonitor.sync` (``opt.health()``), and the steps
that invert, whose one host read (:func:`read_together`) carries the counters as they stood
before that step's update (with a flag for that step's gradients; a non-finite direction of
that update is warned about at the next sync point). Faults decided on the host (inversion retries,
statistics restarts, missing evidence) are counted directly.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..safeguards import HEALTH_COUNTERS, warn_user

__all__ = ["DEVICE_COUNTERS", "HealthMonitor", "MESSAGES", "index_tensor", "read_together"]

_INDEX_CACHE: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}


def index_tensor(ids: Sequence[int], device: torch.device) -> Tensor:
    """A cached int64 tensor of ``ids`` on ``device``: building one from a Python list is a
    host-to-device copy, which synchronises on CUDA; the hot path reuses the cached one."""
    key = (tuple(ids), torch.device(device))
    t = _INDEX_CACHE.get(key)
    if t is None:
        if len(_INDEX_CACHE) > 4096:
            _INDEX_CACHE.clear()
        t = _INDEX_CACHE[key] = torch.tensor(key[0], dtype=torch.int64, device=device)
    return t

def read_together(tensors: Sequence[Tensor | None]) -> list[list[int] | None]:
    """The values of several small integer or bool tensors in one host read per device.

    Each tensor is flattened; the result holds one list of ints per tensor (``None`` for a
    ``None`` entry, an empty list for an empty tensor). On a GPU each ``tolist`` waits for the
    device, so a step that must read several flags reads them here, together.
    """
    out: list[list[int] | None] = [None] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        if t is not None:
            by_device.setdefault(t.device, []).append(i)
    for idx in by_device.values():
        parts = [tensors[i].reshape(-1).to(torch.int64) for i in idx]  # type: ignore[union-attr]
        values = (parts[0] if len(parts) == 1 else torch.cat(parts)).tolist()
        for i, part in zip(idx, parts):
            n = part.numel()
            out[i], values = values[:n], values[n:]
    return out


#: Counters kept on the device (incremented by masks, read only at sync points).
DEVICE_COUNTERS = ("skipped_nonfinite_grad", "skipped_nonfinite_evidence", "skipped_nonfinite_direction")

#: The warning emitted (once per optimizer) the first time each counter moves.
MESSAGES = {
    "skipped_nonfinite_grad": "non-finite gradient; the block's update was skipped",
    "skipped_nonfinite_evidence": "non-finite curvature evidence; statistics update skipped",
    "skipped_nonfinite_direction": "non-finite preconditioned direction; the block's update was skipped",
    "inverse_retry_float64": "an inversion failed or was not finite; retried in float64",
    "inverse_extra_damping": "an inversion failed in float64; retried with more damping",
    "inverse_kept_last": (
        "a curvature factor could not be inverted (non-finite statistics or failed decomposition); "
        "keeping the block's last good inverse"
    ),
    "statistics_restarted": (
        "curvature statistics became non-finite (overflowing or non-finite evidence); they were "
        "restarted from the next evidence and the block keeps its last good inverse"
    ),
    "momentum_reset": "a momentum buffer became non-finite; it was reset to zero",
    "missing_statistics": (
        "statistics were due but step() found no new curvature evidence: call "
        "opt.update_curvature(outputs, loss=...) before loss.backward() on every step where "
        "opt.statistics_due() (otherwise the curvature goes stale); strict=True raises instead"
    ),
    "partial_evidence": (
        "the model ran several forward passes with gradients before step(); a layer-based estimator "
        "reads the records of the last one only, so its statistics came from the last micro-batch "
        "(step once per forward, use an estimator that accumulates micro-batches, or -- K-BFGS -- take "
        "statistics on every step, curvature_every=1, when accumulating)"
    ),
    "missing_evidence": (
        "a factored block got no evidence on a statistics step (its layer was never called "
        "through its forward, or hooks did not fire under torch.compile); it keeps stale "
        "statistics -- see opt.block_plan()"
    ),
}


class HealthMonitor:
    """Per-block counters: device tensors for device-side faults, ints for host decisions."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.host: list[dict[str, int]] = []
        self._device: dict[torch.device, Tensor] = {}
        self._seen: dict[str, int] = {}
        self.warned: set[str] = set()

    # -------------------------------------------------------------- layout
    def add_blocks(self, names: Sequence[str]) -> None:
        """Register new blocks (counters start at zero)."""
        for name in names:
            self.names.append(name)
            self.host.append({c: 0 for c in HEALTH_COUNTERS})
        for device, counts in list(self._device.items()):
            grown = torch.zeros(len(self.names), len(DEVICE_COUNTERS), dtype=torch.int64, device=device)
            grown[: counts.shape[0]] = counts
            self._device[device] = grown

    def _counts(self, device: torch.device) -> Tensor:
        counts = self._device.get(device)
        if counts is None:
            counts = torch.zeros(len(self.names), len(DEVICE_COUNTERS), dtype=torch.int64, device=device)
            self._device[device] = counts
        return counts

    # -------------------------------------------------------------- counting
    def count_device(self, counter: str | Sequence[str], block_ids: Tensor, failed: Tensor) -> None:
        """Add ``failed`` (bool, one per block) to ``counter`` of ``block_ids`` on the device.

        Several counters at once: ``counter`` a sequence of ``k`` names and ``failed`` of shape
        ``(blocks, k)``, one column per counter (one ``index_add_`` when their columns are evenly
        spaced)."""
        counts = self._counts(failed.device)
        if isinstance(counter, str):
            counts[:, DEVICE_COUNTERS.index(counter)].index_add_(0, block_ids, failed.to(torch.int64))
            return
        columns = [DEVICE_COUNTERS.index(c) for c in counter]
        step = columns[1] - columns[0] if len(columns) > 1 else 1
        if step > 0 and columns == list(range(columns[0], columns[0] + step * len(columns), step)):
            counts[:, columns[0] :: step][:, : len(columns)].index_add_(0, block_ids, failed.to(torch.int64))
            return
        for j, column in enumerate(columns):
            counts[:, column].index_add_(0, block_ids, failed[:, j].to(torch.int64))

    def count(self, block: int, counter: str, amount: int = 1) -> None:
        """Count a host-side event."""
        self.host[block][counter] += amount

    # -------------------------------------------------------------- reading
    def device_tensors(self) -> list[Tensor]:
        """The device counters, one ``(blocks, len(DEVICE_COUNTERS))`` tensor per device, for a
        caller that reads them with other values (:func:`read_together`) and passes the values
        to :meth:`sync`."""
        return list(self._device.values())

    def totals(self, values: Sequence[Sequence[int] | None] | None = None) -> list[dict[str, int]]:
        """All counters per block (reads the device counters: a sync point, unless ``values``
        holds what :func:`read_together` read of :meth:`device_tensors`)."""
        out = [dict(h) for h in self.host]
        tensors = list(self._device.values())
        if values is None:
            values = read_together(tensors)
        width = len(DEVICE_COUNTERS)
        for flat in values:
            for bi in range(len(flat or ()) // width):
                for j, name in enumerate(DEVICE_COUNTERS):
                    out[bi][name] += int(flat[bi * width + j])  # type: ignore[index]
        return out

    def sync(self, *, values: Sequence[Sequence[int] | None] | None = None) -> list[dict[str, int]]:
        """Read every counter and warn once for each kind of fault that appeared (``values``:
        the device counters already read, see :meth:`totals`)."""
        totals = self.totals(values)
        for counter in HEALTH_COUNTERS:
            total = sum(t[counter] for t in totals)
            if total > self._seen.get(counter, 0):
                self._seen[counter] = total
                self.warn_once(counter, MESSAGES[counter])
        return totals

    def warn_once(self, key: str, message: str) -> None:
        """Emit a :class:`~curvkit.safeguards.CurvkitWarning` the first time ``key`` is seen,
        attributed to the caller's own line (:func:`~curvkit.safeguards.warn_user`)."""
        if key not in self.warned:
            self.warned.add(key)
            warn_user(f"curvkit: {message} (see opt.health())")

    def state(self) -> list[dict[str, int]]:
        """Counters for the state dict."""
        return self.totals()

    def load(self, saved: Sequence[dict[str, int]]) -> None:
        """Restore counters (device counters are folded into the host ones)."""
        for device in list(self._device):
            self._device[device].zero_()
        for bi, counters in enumerate(saved):
            self.host[bi] = {c: int(counters.get(c, 0)) for c in HEALTH_COUNTERS}
            self._seen = {}
