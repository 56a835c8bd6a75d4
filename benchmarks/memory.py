"""Memory measurements of a run: optimizer state bytes and sampled peak resident memory.

* **optimizer state** (:func:`state_bytes`): the sum of ``numel * element_size`` over every
  tensor in ``optimizer.state_dict()`` (nested dicts and lists included), measured after the run.
* **peak RSS increase** (:class:`PeakRSS`): a background thread reads the process's resident set
  size from ``/proc/self/statm`` every ``interval`` seconds during the run and reports the peak
  minus the value at the start of the run. It sees model activations, gradients, optimizer state
  and temporaries that live longer than the sampling interval. To make resident memory follow
  live tensors, :func:`return_freed_memory` asks glibc to serve allocations from 64 KiB by
  ``mmap`` (so freed tensors go back to the system) and trims the heap before each run. Where
  ``/proc/self/statm`` does not exist the peak falls back to ``resource.getrusage`` max RSS
  (monotone over the process: it then only shows growth beyond earlier runs' peaks), and the
  table says which was used.

The ``mmap`` setting lasts only while a :class:`PeakRSS` window is open: on exit,
:func:`settle_allocator` gives glibc the thresholds its dynamic adjustment settles to in a long
training process (large blocks kept on the heap). Left at 64 KiB, every tensor of 64 KiB or more
would be mapped, page-faulted in and unmapped at each step of whatever is timed next, which
charged the methods with large temporaries (a 128 x 128 float32 factor is exactly 64 KiB) for the
memory measurement: on the digits autoencoder 30 page faults per TNT step and none for SGD-m
(TNT against SGD-m alone, alternating by epoch: 3.44-3.45x with the 64 KiB threshold, 3.37-3.39x
without).
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import sys
import threading
from typing import Any

from torch import Tensor

__all__ = ["PeakRSS", "current_rss", "return_freed_memory", "settle_allocator", "state_bytes"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATM = "/proc/self/statm"
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's thresholds while a memory measurement runs: allocations from 64 KiB are mapped, so
#: resident memory follows live tensors.
MEASURING_MMAP_THRESHOLD = 64 * 1024
#: The thresholds for timed code, unless the environment sets them (``MALLOC_MMAP_THRESHOLD_``,
#: ``MALLOC_TRIM_THRESHOLD_``): the largest mmap threshold glibc's dynamic adjustment reaches on a
#: 64-bit system (32 MiB) and twice it for trimming, which is where that adjustment puts the trim
#: threshold. An explicit setting ends the dynamic adjustment for the process, so the measurement
#: window cannot hand it back; these are the values a long training run settles to instead.
TIMING_MMAP_THRESHOLD = 32 * 2**20
TIMING_TRIM_THRESHOLD = 64 * 2**20


def state_bytes(obj: Any) -> int:
    """Total bytes of the tensors in a (nested) state dict."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def current_rss() -> int | None:
    """Resident set size of this process in bytes (``None`` without ``/proc``)."""
    try:
        with open(_STATM, "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:
        return None


def _max_rss() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _libc() -> Any:
    """glibc, or ``None`` (another C library, another system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (both exist on glibc)
    except (OSError, AttributeError):
        return None
    return libc


def return_freed_memory() -> None:
    """Collect garbage and, on glibc, return freed heap memory to the system.

    It also sets glibc's mmap threshold to 64 KiB (:data:`MEASURING_MMAP_THRESHOLD`), so that
    large tensors are allocated by ``mmap`` and released on free (glibc otherwise raises the
    threshold dynamically and keeps freed memory resident), until :func:`settle_allocator`.
    Elsewhere it only collects garbage.
    """
    gc.collect()
    libc = _libc()
    if libc is None:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, MEASURING_MMAP_THRESHOLD)
    libc.malloc_trim(0)


def _env_bytes(name: str, default: int) -> int:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return default


def settle_allocator() -> None:
    """Give glibc the thresholds for timed code after a memory measurement (see the module
    docstring): ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` from the environment
    where set, :data:`TIMING_MMAP_THRESHOLD` and :data:`TIMING_TRIM_THRESHOLD` otherwise. A no-op
    without glibc."""
    libc = _libc()
    if libc is None:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _env_bytes("MALLOC_MMAP_THRESHOLD_", TIMING_MMAP_THRESHOLD))
    libc.mallopt(_M_TRIM_THRESHOLD, _env_bytes("MALLOC_TRIM_THRESHOLD_", TIMING_TRIM_THRESHOLD))


class PeakRSS:
    """Context manager sampling resident memory; ``peak_bytes`` is the increase over the start.

    While it is open, glibc maps allocations from 64 KiB (:func:`return_freed_memory`); on exit
    it gets the thresholds for timed code back (:func:`settle_allocator`). Code timed inside the
    window pays for the mapping (page faults on every large temporary).

    Attributes:
        method: ``"sampled /proc/self/statm"`` or ``"getrusage max RSS delta"``.
        peak_bytes: the measured increase (after exit).
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self.method = "sampled /proc/self/statm" if current_rss() is not None else "getrusage max RSS delta"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0
        self._peak = 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = current_rss()
            if rss is not None and rss > self._peak:
                self._peak = rss

    def __enter__(self) -> "PeakRSS":
        return_freed_memory()
        if self.method.startswith("sampled"):
            self._start = self._peak = current_rss() or 0
            self._thread = threading.Thread(target=self._sample, name="curvkit-bench-rss", daemon=True)
            self._thread.start()
        else:
            self._start = _max_rss()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, current_rss() or 0)
        else:
            self._peak = _max_rss()
        self.peak_bytes = max(0, self._peak - self._start)
        settle_allocator()
