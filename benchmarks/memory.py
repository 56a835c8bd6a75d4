"""Memory measurements of a run: optimizer state bytes and sampled peak resident memory.

* **optimizer state** (:func:`state_bytes`): the sum of ``numel * element_size`` over every
  tensor in ``optimizer.state_dict()`` (nested dicts and lists included), measured after the run.
* **peak RSS increase** (:class:`PeakRSS`): a background thread reads the process's resident set
  size from ``/proc/self/statm`` every ``interval`` seconds during the run and reports the peak
  minus the value at the start of the run. It sees model activations, gradients, optimizer state
  and temporaries that live longer than the sampling interval. To make resident memory follow
  live tensors, :func:`return_freed_memory` asks glibc to serve large allocations by ``mmap`` (so
  freed tensors go back to the system) and trims the heap before each run. Where
  ``/proc/self/statm`` does not exist the peak falls back to ``resource.getrusage`` max RSS
  (monotone over the process: it then only shows growth beyond earlier runs' peaks), and the
  table says which was used.
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

__all__ = ["PeakRSS", "current_rss", "return_freed_memory", "state_bytes"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATM = "/proc/self/statm"
_M_MMAP_THRESHOLD = -3
_configured = False


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


def return_freed_memory() -> None:
    """Collect garbage and, on glibc, return freed heap memory to the system.

    The first call also fixes glibc's mmap threshold at 64 KiB so that large tensors are
    allocated by ``mmap`` and released on free (glibc otherwise raises the threshold
    dynamically and keeps freed memory resident). Elsewhere it only collects garbage.
    """
    global _configured
    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        if not _configured:
            libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
            _configured = True
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Context manager sampling resident memory; ``peak_bytes`` is the increase over the start.

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
