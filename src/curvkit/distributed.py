r"""The distributed layer: the few collectives a curvature optimizer needs, behind one interface.

A :class:`Distributor` is what the optimizer calls when it runs on several processes
(:mod:`torch.distributed`, under :class:`~torch.nn.parallel.DistributedDataParallel` or FSDP2's
``torch.distributed.fsdp.fully_shard``). It offers exactly the operations a
second-order method needs, each bucketed so that the number of collectives per step stays
small and independent of the number of blocks:

* :meth:`~Distributor.average_`: average statistics over the ranks in place (one flat
  ``all_reduce`` per ``(dtype, device)`` bucket), so every rank holds the statistics of the
  global batch;
* :meth:`~Distributor.assign` and :meth:`~Distributor.share_`: split the inversion work between
  the ranks (longest-processing-time greedy on a cost such as :func:`inverse_cost`, decided once
  at plan time and identical on every rank), then give every rank every owner's result (one
  collective per bucket); :func:`share_eigenbases` does the same for eigenbasis inverters'
  ``(vectors, values)`` results;
* :meth:`~Distributor.all_` and :meth:`~Distributor.sum_`: agree on flags (one rank's
  non-finite evidence skips the update everywhere) and keep counters consistent.

:class:`SingleProcess` is the trivial implementation (every call is local); :class:`TorchDistributed`
runs the collectives on a :mod:`torch.distributed` process group; :func:`make_distributor` picks
the one that fits. With ``check=True``, :class:`TorchDistributed` precedes each collective by a
small participation check that turns a rank skipping a call (a hang, or gloo's "collective
mismatch" abort) into a :class:`CollectiveMismatchError` naming the call, the step and the rank.

The DTensor helpers :func:`is_dtensor`, :func:`full_tensor` and :func:`local_like` move between
FSDP2's sharded parameters and gradients and the full tensors a block's factors are built from.
The how-to page *Run distributed* of the curvkit documentation describes what FSDP2 and DCP do
with these objects on torch 2.13.

No method reads a tensor value on the host, except the participation check when it is on.
"""

from __future__ import annotations

import heapq
import math
from abc import ABC, abstractmethod
from datetime import timedelta
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = [
    "CollectiveMismatchError",
    "Distributor",
    "SingleProcess",
    "TorchDistributed",
    "assign_lpt",
    "full_tensor",
    "full_tensors",
    "inverse_cost",
    "is_dtensor",
    "local_like",
    "make_distributor",
    "share_eigenbases",
]

#: Share strategies of :class:`TorchDistributed` (see :meth:`Distributor.share_`).
SHARE_METHODS = ("all_gather", "all_reduce")
#: Longest call name the participation check transmits (longer names are cut).
_NAME_BYTES = 48


class CollectiveMismatchError(RuntimeError):
    """The ranks did not make the same sequence of collective calls.

    Raised by the participation check of :class:`TorchDistributed` (``check=True``) on every
    rank, with a message such as ``"rank 1 did not call update_curvature at step 3"``.
    """


# ----------------------------------------------------------------------------- work assignment
def inverse_cost(size: int) -> float:
    r"""The cost model of inverting (or eigendecomposing) a ``size x size`` factor: :math:`d^3`.

    Args:
        size: the factor's dimension ``d`` (an integer ``>= 0``).
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"size must be an integer >= 0 (a factor's dimension), got {size!r}")
    return float(size) ** 3


def assign_lpt(costs: Sequence[float], world_size: int) -> list[int]:
    r"""Owner rank of each work unit by longest-processing-time (LPT) greedy scheduling.

    Units are taken in order of decreasing cost (ties by index) and each goes to the rank with
    the least work so far (ties by lower rank). The result depends only on ``costs`` and
    ``world_size``, so every rank computes the same assignment without communicating. The
    largest per-rank load is at most :math:`(4/3 - 1/(3W))` times the optimum (Graham, 1969),
    and never more than the mean load plus the largest single cost.

    Args:
        costs: one finite cost ``>= 0`` per work unit (for inverses, :func:`inverse_cost`).
        world_size: the number of ranks ``W >= 1``.

    Returns:
        ``owners[i]`` in ``range(world_size)`` for every unit ``i``.
    """
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    values = []
    for i, c in enumerate(costs):
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
            raise ValueError(
                f"costs[{i}] must be a finite number >= 0 (a Python number computed at plan time, "
                f"not a tensor), got {c!r}"
            )
        values.append(float(c))
    owners = [0] * len(values)
    heap = [(0.0, r) for r in range(world_size)]  # (load, rank): the least loaded, lowest rank first
    for i in sorted(range(len(values)), key=lambda i: (-values[i], i)):
        load, r = heapq.heappop(heap)
        owners[i] = r
        heapq.heappush(heap, (load + values[i], r))
    return owners


# ----------------------------------------------------------------------------- helpers
def _check_tensors(name: str, tensors: Sequence[Tensor]) -> list[Tensor]:
    out = list(tensors)
    for i, t in enumerate(out):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if is_dtensor(t):
            raise ValueError(
                f"{name}[{i}] is a DTensor; the distributor works on plain tensors: pass "
                f"full_tensor(t) (the whole tensor) or t.to_local() (this rank's shard)"
            )
    return out


def _buckets(tensors: Sequence[Tensor]) -> dict[tuple[torch.dtype, torch.device], list[int]]:
    """Indices of ``tensors`` grouped by (dtype, device), in first-appearance order."""
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return groups


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if len(tensors) > 1 else tensors[0].reshape(-1).clone()


def _unflatten_into(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


# ----------------------------------------------------------------------------- interface
class Distributor(ABC):
    """The collectives of a curvature optimizer across ranks.

    Methods marked *collective* must be called by every rank of the group, in the same order,
    with tensors of the same shapes, dtypes and devices (their values may differ). The keyword
    options ``call`` and ``step`` only label the call for the participation check of
    :class:`TorchDistributed` and for error messages (``call="update_curvature", step=3``).
    """

    @property
    @abstractmethod
    def world_size(self) -> int:
        """The number of ranks ``W``."""

    @property
    @abstractmethod
    def rank(self) -> int:
        """This process's rank in ``range(W)``."""

    # ---- validation shared by the implementations
    def _validate_owners(self, tensors: list[Tensor], owners: Sequence[int]) -> list[int]:
        owners = list(owners)
        if len(owners) != len(tensors):
            raise ValueError(
                f"owners must hold one rank per tensor ({len(tensors)} tensors), got {len(owners)} owners"
            )
        for i, r in enumerate(owners):
            if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < self.world_size:
                raise ValueError(
                    f"owners[{i}] must be a rank in range({self.world_size}) (as returned by assign), got {r!r}"
                )
        return owners

    @staticmethod
    def _validate_floating(name: str, tensors: list[Tensor]) -> None:
        for i, t in enumerate(tensors):
            if not (t.is_floating_point() or t.is_complex()):
                raise ValueError(
                    f"{name}[{i}] must be a floating-point tensor to be averaged, got dtype {t.dtype}; "
                    f"use sum_ for counters"
                )

    # ---- the operations
    @abstractmethod
    def average_(self, tensors: Sequence[Tensor], *, call: str = "average_", step: int = -1) -> None:
        """Replace every tensor by its mean over the ranks, in place (*collective*).

        One flat ``all_reduce`` per ``(dtype, device)`` bucket. The result is bit-identical on
        every rank. Tensors must be floating point.
        """

    def assign(self, costs: Sequence[float]) -> list[int]:
        """Owner rank of each work unit, balanced by cost (LPT greedy, see :func:`assign_lpt`).

        Not a collective: deterministic in ``costs`` and :attr:`world_size`, so every rank gets
        the same list. Call it at plan time with Python numbers (for inverses,
        :func:`inverse_cost` of each factor's size) and reuse the result every inversion.
        """
        return assign_lpt(costs, self.world_size)

    @abstractmethod
    def share_(self, tensors: Sequence[Tensor], owners: Sequence[int], *, call: str = "share_", step: int = -1) -> None:
        """Give every rank the owner's value of each tensor, in place (*collective*).

        ``tensors[i]`` holds valid values on rank ``owners[i]`` (which filled it, for example
        with an inverse) and is overwritten with them on every other rank. One collective per
        ``(dtype, device)`` bucket; afterwards the tensors are bit-identical on all ranks.
        """

    @abstractmethod
    def all_(self, flags: Tensor, *, call: str = "all_", step: int = -1) -> Tensor:
        """Element-wise logical AND of a ``bool`` tensor over the ranks (*collective*).

        Returns a new ``bool`` tensor, identical on every rank: one rank's ``False`` (for
        example non-finite evidence) makes the entry ``False`` everywhere.
        """

    @abstractmethod
    def sum_(self, counts: Tensor, *, call: str = "sum_", step: int = -1) -> Tensor:
        """Sum an integer or floating tensor over the ranks, in place (*collective*); returns it."""

    def check(self, call: str, *, step: int = -1) -> None:
        """Verify that every rank is at the same collective call (``call`` at ``step``).

        A no-op unless the implementation checks participation (:class:`TorchDistributed` with
        ``check=True``, where every collective method already calls it).
        """


class SingleProcess(Distributor):
    """One process: every collective is the identity (inputs are still validated)."""

    @property
    def world_size(self) -> int:
        return 1

    @property
    def rank(self) -> int:
        return 0

    def average_(self, tensors: Sequence[Tensor], *, call: str = "average_", step: int = -1) -> None:
        self._validate_floating("tensors", _check_tensors("tensors", tensors))

    def share_(self, tensors: Sequence[Tensor], owners: Sequence[int], *, call: str = "share_", step: int = -1) -> None:
        self._validate_owners(_check_tensors("tensors", tensors), owners)

    def all_(self, flags: Tensor, *, call: str = "all_", step: int = -1) -> Tensor:
        _check_flags(flags)
        return flags.clone()

    def sum_(self, counts: Tensor, *, call: str = "sum_", step: int = -1) -> Tensor:
        _check_counts(counts)
        return counts

    def __repr__(self) -> str:
        return "SingleProcess()"


def _check_flags(flags: Any) -> None:
    if not isinstance(flags, Tensor) or flags.dtype != torch.bool:
        got = flags.dtype if isinstance(flags, Tensor) else type(flags).__name__
        raise ValueError(f"flags must be a bool tensor, got {got}; compare first (for example torch.isfinite(x).all())")
    if is_dtensor(flags):
        raise ValueError("flags is a DTensor; pass a plain bool tensor (flags.to_local() or full_tensor(flags))")


def _check_counts(counts: Any) -> None:
    if not isinstance(counts, Tensor) or counts.dtype == torch.bool:
        got = counts.dtype if isinstance(counts, Tensor) else type(counts).__name__
        raise ValueError(f"counts must be an integer or floating tensor, got {got}; use all_ for bool flags")
    if is_dtensor(counts):
        raise ValueError("counts is a DTensor; pass a plain tensor (counts.to_local() or full_tensor(counts))")


class TorchDistributed(Distributor):
    """The collectives on a :mod:`torch.distributed` process group.

    Construct it on every rank, in the same order relative to other process-group creation
    (with ``check=True`` it creates a gloo group for the checks, which is itself collective).

    Args:
        process_group: the group to run on; ``None`` is the default (world) group. Ranks in
            owners and :attr:`rank` are ranks *within* this group.
        check: precede every collective by a participation check (one small ``all_gather`` on
            a separate gloo group and a host read of its result) that raises
            :class:`CollectiveMismatchError` naming the call a rank skipped, instead of hanging
            or aborting in the backend. Off by default: it costs one extra round trip per
            collective and makes the CPU wait for the slowest rank at every call, which removes
            the overlap of asynchronous (NCCL) collectives with compute. Turn it on to debug.
        check_timeout: seconds the check waits for every rank before raising
            :class:`CollectiveMismatchError` (a rank that stopped making calls).
        share: how :meth:`share_` communicates: ``"all_reduce"`` (a flat buffer with zeros where
            this rank is not the owner, summed; the default) or ``"all_gather"`` (each rank
            contributes a buffer of its owned tensors, padded to the longest, and unpacks the
            others'). On gloo (CPU) with the MNIST-autoencoder factors, ``benchmarks/distributed.py``
            measured ``all_reduce`` faster in wall and CPU time at 2 and 4 ranks, although
            ``all_gather`` moves about half the bytes; on NCCL, unmeasured, ``all_gather`` may win.
            Both give every rank the owner's bits, except that ``all_reduce`` turns a ``-0.0``
            into ``+0.0`` (on every rank alike).
    """

    def __init__(
        self,
        process_group: Any = None,
        *,
        check: bool = False,
        check_timeout: float = 60.0,
        share: str = "all_reduce",
    ) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "TorchDistributed needs an initialised torch.distributed process group: call "
                "torch.distributed.init_process_group first (torchrun sets the environment), or use "
                "make_distributor(), which falls back to SingleProcess"
            )
        if not isinstance(check, bool):
            raise ValueError(f"check must be a bool, got {check!r}")
        if isinstance(check_timeout, bool) or not isinstance(check_timeout, (int, float)) or not (
            math.isfinite(check_timeout) and check_timeout > 0
        ):
            raise ValueError(f"check_timeout must be a finite number of seconds > 0, got {check_timeout!r}")
        if share not in SHARE_METHODS:
            raise ValueError(f"share must be one of {SHARE_METHODS!r}, got {share!r}")
        self._dist = dist
        self.process_group = process_group
        self._world = dist.get_world_size(process_group)
        self._rank = dist.get_rank(process_group)
        if self._rank < 0:
            raise ValueError("process_group does not contain this rank; construct TorchDistributed only on its members")
        self.share_method = share
        self.check_enabled = check
        self.check_timeout = float(check_timeout)
        self._calls = 0
        self._check_group = None
        if check:
            ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
            self._check_group = dist.new_group(
                ranks=ranks, backend="gloo", timeout=timedelta(seconds=self.check_timeout)
            )

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def rank(self) -> int:
        return self._rank

    def __repr__(self) -> str:
        return (
            f"TorchDistributed(rank={self._rank}, world_size={self._world}, "
            f"check={self.check_enabled}, share={self.share_method!r})"
        )

    def _all_gather(self, out: Tensor, tensor: Tensor, *, group: Any) -> None:
        # all_gather_single is torch 2.13's name for all_gather_into_tensor (now deprecated)
        gather = getattr(self._dist, "all_gather_single", None) or self._dist.all_gather_into_tensor
        gather(out, tensor, group=group)

    # ---- participation check
    def check(self, call: str, *, step: int = -1) -> None:
        if not isinstance(call, str):
            raise ValueError(f"call must be a str naming the optimizer call (e.g. 'update_curvature'), got {call!r}")
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"step must be an int (the optimizer's step count, -1 if none), got {step!r}")
        if not self.check_enabled:
            return
        self._calls += 1
        name = call.encode("utf-8")[:_NAME_BYTES]
        mine = torch.zeros(3 + _NAME_BYTES, dtype=torch.int64)
        mine[0], mine[1], mine[2] = self._calls, int(step), len(name)
        if name:
            mine[3 : 3 + len(name)] = torch.tensor(list(name), dtype=torch.int64)
        gathered = torch.empty(self._world * mine.numel(), dtype=torch.int64)
        try:
            self._all_gather(gathered, mine, group=self._check_group)
        except RuntimeError as exc:
            raise CollectiveMismatchError(
                f"rank {self._rank}: not every rank reached collective call #{self._calls} "
                f"({call} at step {step}) within check_timeout={self.check_timeout} s: a rank skipped "
                f"this call and made no further checked call, or stopped ({exc})"
            ) from exc
        rows = gathered.view(self._world, -1).tolist()  # the check's one host read (gloo, CPU)
        seen = [(int(r[0]), int(r[1]), bytes(r[3 : 3 + int(r[2])]).decode("utf-8", "replace")) for r in rows]
        if all(s == seen[0] for s in seen):
            return
        raise CollectiveMismatchError(_mismatch_message(seen))

    # ---- collectives
    def average_(self, tensors: Sequence[Tensor], *, call: str = "average_", step: int = -1) -> None:
        tensors = _check_tensors("tensors", tensors)
        self._validate_floating("tensors", tensors)
        self.check(call, step=step)
        if self._world == 1:
            return
        for idx in _buckets(tensors).values():
            group = [tensors[i] for i in idx]
            flat = _flat(group)
            self._dist.all_reduce(flat, group=self.process_group)
            flat.div_(self._world)
            _unflatten_into(flat, group)

    def share_(self, tensors: Sequence[Tensor], owners: Sequence[int], *, call: str = "share_", step: int = -1) -> None:
        tensors = _check_tensors("tensors", tensors)
        owners = self._validate_owners(tensors, owners)
        self.check(call, step=step)
        if self._world == 1:
            return
        for idx in _buckets(tensors).values():
            if self.share_method == "all_gather":
                self._share_gather([tensors[i] for i in idx], [owners[i] for i in idx])
            else:
                self._share_reduce([tensors[i] for i in idx], [owners[i] for i in idx])

    def _share_gather(self, tensors: list[Tensor], owners: list[int]) -> None:
        per_rank: list[list[Tensor]] = [[] for _ in range(self._world)]
        for t, r in zip(tensors, owners):
            per_rank[r].append(t)
        width = max(sum(t.numel() for t in ts) for ts in per_rank)
        if width == 0:
            return
        ref = tensors[0]
        send = torch.zeros(width, dtype=ref.dtype, device=ref.device)
        mine = per_rank[self._rank]
        if mine:
            n = sum(t.numel() for t in mine)
            torch.cat([t.reshape(-1) for t in mine], out=send[:n])
        out = torch.empty(self._world * width, dtype=ref.dtype, device=ref.device)
        self._all_gather(out, send, group=self.process_group)
        for r, ts in enumerate(per_rank):
            if r != self._rank and ts:
                _unflatten_into(out[r * width : (r + 1) * width], ts)

    def _share_reduce(self, tensors: list[Tensor], owners: list[int]) -> None:
        flat = torch.cat([
            t.reshape(-1) if r == self._rank else t.new_zeros(t.numel()) for t, r in zip(tensors, owners)
        ])
        self._dist.all_reduce(flat, group=self.process_group)
        _unflatten_into(flat, [t for t in tensors])

    def all_(self, flags: Tensor, *, call: str = "all_", step: int = -1) -> Tensor:
        _check_flags(flags)
        self.check(call, step=step)
        as_int = flags.to(torch.uint8)
        self._dist.all_reduce(as_int, op=self._dist.ReduceOp.MIN, group=self.process_group)
        return as_int.bool()

    def sum_(self, counts: Tensor, *, call: str = "sum_", step: int = -1) -> Tensor:
        _check_counts(counts)
        self.check(call, step=step)
        self._dist.all_reduce(counts, group=self.process_group)
        return counts


def _mismatch_message(seen: list[tuple[int, int, str]]) -> str:
    """Name the ranks whose call differs from the majority (ties: the ranks behind, then rank 0)."""
    votes: dict[tuple[int, int, str], list[int]] = {}
    for r, s in enumerate(seen):
        votes.setdefault(s, []).append(r)
    # The reference: most ranks; on a tie the call of the earlier step (the others ran ahead,
    # having skipped it), then the group containing the lowest rank.
    ref, ref_ranks = min(votes.items(), key=lambda kv: (-len(kv[1]), kv[0][1], kv[1][0]))
    _, ref_step, ref_name = ref
    parts = []
    for r, (seq, step, name) in enumerate(seen):
        if (seq, step, name) != ref:
            parts.append(
                f"rank {r} did not call {ref_name} at step {ref_step} "
                f"(its collective call #{seq} was {name} at step {step})"
            )
    return (
        "curvkit: the ranks made different collective calls: " + "; ".join(parts)
        + f". Ranks {ref_ranks} called {ref_name} at step {ref_step}. Every rank must make the same "
        "optimizer calls (update_curvature, step, ...) in the same order; do not skip one on some "
        "ranks based on rank-local values."
    )


def make_distributor(process_group: Any = None, **options: Any) -> Distributor:
    """:class:`TorchDistributed` when :mod:`torch.distributed` is initialised, else :class:`SingleProcess`.

    Args:
        process_group: the group for :class:`TorchDistributed` (``None``: the world group).
        **options: keyword options of :class:`TorchDistributed` (``check``, ``check_timeout``,
            ``share``); they are validated but unused when falling back to one process.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return TorchDistributed(process_group, **options)
    if process_group is not None:
        raise ValueError(
            "process_group was given but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group first"
        )
    unknown = sorted(set(options) - {"check", "check_timeout", "share"})
    if unknown:
        raise ValueError(f"make_distributor got unknown option(s) {unknown}; valid options are ['check', 'check_timeout', 'share']")
    if "share" in options and options["share"] not in SHARE_METHODS:
        raise ValueError(f"share must be one of {SHARE_METHODS!r}, got {options['share']!r}")
    return SingleProcess()


def share_eigenbases(
    distributor: Distributor,
    sizes: Sequence[tuple[int, torch.dtype, torch.device]],
    owners: Sequence[int],
    results: Sequence[Any],
    *,
    call: str = "invert",
    step: int = -1,
) -> list[tuple[Tensor, Tensor]]:
    r"""Give every rank the owner's eigenbasis of each factor (*collective*, two buckets).

    The eigenbasis counterpart of :meth:`Distributor.share_` for inverters that return
    :math:`V = Q\,\mathrm{diag}(\lambda)\,Q^\top` as ``(vectors, values)`` (SOAP's
    ``eigenbasis``): each factor is decomposed by its owner only, and every rank gets the owner's
    ``Q`` and :math:`\lambda`, bit for bit.

    Args:
        distributor: the distributor of the ranks.
        sizes: ``(d, dtype, device)`` of each factor.
        owners: the owner rank of each factor (from :meth:`Distributor.assign`).
        results: on the owner, the factor's result: a ``(vectors, values)`` pair, an object
            with ``vectors`` and ``values`` attributes (a kept previous
            :class:`~curvkit.operators.EigenBasis`), or ``None`` (identity: ``Q = I``,
            :math:`\lambda = 1`); ignored on the other ranks.
        call, step: labels for the participation check.

    Returns:
        One ``(vectors, values)`` pair of plain tensors per factor, identical on every rank.
    """
    if not (len(sizes) == len(owners) == len(results)):
        raise ValueError(
            f"sizes, owners and results must have one entry per factor, got {len(sizes)}, {len(owners)} "
            f"and {len(results)}"
        )
    vectors: list[Tensor] = []
    values: list[Tensor] = []
    for (d, dtype, device), owner, result in zip(sizes, owners, results):
        if owner != distributor.rank:
            vectors.append(torch.zeros(d, d, dtype=dtype, device=device))
            values.append(torch.zeros(d, dtype=dtype, device=device))
        elif result is None:
            vectors.append(torch.eye(d, dtype=dtype, device=device))
            values.append(torch.ones(d, dtype=dtype, device=device))
        else:
            q, lam = result if isinstance(result, tuple) else (result.vectors, result.values)
            vectors.append(q.to(dtype).clone(memory_format=torch.contiguous_format))
            values.append(lam.to(dtype).clone(memory_format=torch.contiguous_format))
    distributor.share_(vectors + values, list(owners) + list(owners), call=call, step=step)
    return list(zip(vectors, values))


# ----------------------------------------------------------------------------- DTensor / FSDP2
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without torch.distributed
        return None
    return DTensor


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 parameters and gradients are)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor behind ``t``: gathered from the shards for a DTensor (*collective* over
    its mesh: every rank must call it), ``t`` itself for a plain tensor.

    The result is a plain tensor with the global shape, on every rank.
    """
    if not isinstance(t, Tensor):
        raise ValueError(f"t must be a torch.Tensor, got {type(t).__name__}")
    return t.full_tensor() if is_dtensor(t) else t


def _shard0_rows(rows: int, world: int) -> list[int]:
    """Rows of each rank under ``Shard(0)``: :func:`torch.chunk`'s split, empty chunks last."""
    sizes = [c.shape[0] for c in torch.empty(rows, device="meta").chunk(world)] if rows else []
    return sizes + [0] * (world - len(sizes))


def full_tensors(tensors: Sequence[Tensor]) -> list[Tensor]:
    """:func:`full_tensor` of many tensors with one ``all_gather`` per bucket (*collective*).

    DTensors sharded on dim 0 of a one-dimensional mesh (FSDP2's layout of parameters,
    gradients and ``zeros_like`` state) are grouped by ``(dtype, device, mesh)``; each group's
    local shards are packed into one buffer per rank and gathered in a single
    ``all_gather_single`` on the mesh's process group, instead of one collective per tensor.
    Other DTensors fall back to :func:`full_tensor` one by one; plain tensors are returned as
    they are. Every rank of the meshes must call it with the same list of tensors.

    Returns:
        One plain tensor of the global shape per input, in order.
    """
    import torch.distributed as dist

    items = list(tensors)
    out: list[Tensor | None] = [None] * len(items)
    buckets: dict[tuple[Any, ...], list[int]] = {}
    for i, t in enumerate(items):
        if not isinstance(t, Tensor):
            raise ValueError(f"tensors[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if not is_dtensor(t):
            out[i] = t
            continue
        from torch.distributed.tensor import Shard

        mesh = t.device_mesh
        if mesh.ndim == 1 and tuple(t.placements) == (Shard(0),) and t.ndim >= 1:
            buckets.setdefault((t.dtype, t.to_local().device, mesh), []).append(i)
        else:
            out[i] = t.full_tensor()
    for (dtype, device, mesh), idx in buckets.items():
        world, rank = mesh.size(), mesh.get_local_rank()
        rows = {i: _shard0_rows(items[i].shape[0], world) for i in idx}
        inner = {i: math.prod(items[i].shape[1:]) for i in idx}
        per_rank = [sum(rows[i][k] * inner[i] for i in idx) for k in range(world)]
        width = max(per_rank)
        send = torch.zeros(width, dtype=dtype, device=device)
        offset = 0
        for i in idx:
            local = items[i].detach().to_local()
            if local.shape[0] != rows[i][rank]:
                raise ValueError(
                    f"tensors[{i}] has {local.shape[0]} local rows on mesh rank {rank}, but Shard(0) of "
                    f"{items[i].shape[0]} rows over {world} ranks gives {rows[i][rank]}: an uneven layout "
                    f"this helper does not know; call full_tensor on it"
                )
            n = local.numel()
            send[offset : offset + n] = local.reshape(-1)
            offset += n
        gathered = torch.empty(world * width, dtype=dtype, device=device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(gathered, send, group=mesh.get_group())
        offsets = [k * width for k in range(world)]
        for i in idx:
            pieces = []
            for k in range(world):
                n = rows[i][k] * inner[i]
                pieces.append(gathered[offsets[k] : offsets[k] + n])
                offsets[k] += n
            out[i] = torch.cat(pieces).view(items[i].shape)
    return out  # type: ignore[return-value]


def local_like(full: Tensor, like: Tensor) -> Tensor:
    """This rank's part of ``full`` laid out like ``like`` (no communication).

    For a DTensor ``like`` (an FSDP2 parameter or gradient), returns a DTensor with ``like``'s
    mesh, placements and global shape whose local tensor is this rank's shard of ``full``
    (``.to_local()`` gives it as a plain tensor). ``full`` must hold the same values on every
    rank (for example a direction computed from gathered gradients and shared inverses). For a
    plain ``like`` it returns ``full``.

    Args:
        full: the whole tensor, of ``like``'s global shape.
        like: the tensor whose layout to copy.
    """
    if not isinstance(full, Tensor) or is_dtensor(full):
        raise ValueError(f"full must be a plain torch.Tensor (the whole tensor), got {type(full).__name__}")
    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"full has shape {tuple(full.shape)} but like has global shape {tuple(like.shape)}")
    if not is_dtensor(like):
        return full
    from torch.distributed.tensor import Partial, distribute_tensor

    if any(isinstance(p, Partial) for p in like.placements):
        raise ValueError(
            f"like has placements {like.placements}; a Partial (unreduced) layout has no shard of a full "
            f"tensor: reduce it first (like.redistribute to Shard or Replicate)"
        )
    # src_data_rank=None: every rank cuts its own shard out of its own copy, no communication.
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
