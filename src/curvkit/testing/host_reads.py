"""Counting host reads of tensor values: the check that a hot path never synchronises.

A read of a tensor's value on the host (``Tensor.item``, ``tolist``, ``__bool__``, ``__float__``,
``__int__``) waits for the device on a GPU. :func:`count_host_reads` patches those methods for
the duration of a ``with`` block and counts the calls, either all of them or only those made while
given methods run (a plugin's estimator, say, leaving the engine's own reads out)::

    with count_host_reads() as reads:
        train_step(model, opt, x, y)
    assert reads.count == 0, reads.where
"""

from __future__ import annotations

import functools
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

__all__ = ["HostReads", "count_host_reads"]

#: The ``torch.Tensor`` methods that read a value on the host.
HOST_READS: tuple[str, ...] = ("item", "tolist", "__bool__", "__float__", "__int__")


@dataclass
class HostReads:
    """What :func:`count_host_reads` saw.

    Attributes:
        count: host reads counted.
        where: one ``(method, caller line)`` per read, for the failure message.
    """

    count: int = 0
    where: list[tuple[str, str]] = field(default_factory=list)
    _inside: int = field(default=0, init=False, repr=False)


@contextmanager
def count_host_reads(owners: Sequence[tuple[Any, str]] | None = None) -> Iterator[HostReads]:
    """Count host reads of tensor values inside the ``with`` block.

    Args:
        owners: ``(object, method name)`` pairs; when given, only reads made while one of those
            methods runs are counted (a missing method is skipped). ``None`` counts every read.

    Yields:
        The :class:`HostReads` record, filled as the block runs. The patches are undone on exit.
    """
    reads = HostReads()
    reads._inside = 1 if owners is None else 0
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    restore: list[tuple[Any, str, Any, bool]] = []

    def patched(name: str, original: Any) -> Any:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if reads._inside:
                reads.count += 1
                reads.where.append((name, traceback.format_stack(limit=3)[0].strip()))
            return original(self, *args, **kwargs)

        return read

    def watched(bound: Any) -> Any:
        @functools.wraps(bound)
        def run(*args: Any, **kwargs: Any) -> Any:
            reads._inside += 1
            try:
                return bound(*args, **kwargs)
            finally:
                reads._inside -= 1

        return run

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, patched(name, original))
        for obj, method in owners or ():
            if not hasattr(obj, method):
                continue
            had_own = method in getattr(obj, "__dict__", {})
            restore.append((obj, method, obj.__dict__.get(method) if had_own else None, had_own))
            setattr(obj, method, watched(getattr(obj, method)))
        yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        for obj, method, previous, had_own in reversed(restore):
            if had_own:
                setattr(obj, method, previous)
            else:
                delattr(obj, method)
