r"""FSDP2 (``fully_shard``) parameters: the engine works on full tensors, each rank writes its shard.

Under FSDP2 every parameter and every gradient is a ``DTensor`` sharded on dim 0, and
:func:`torch.autograd.grad` cannot differentiate with respect to the sharded parameters (the
forward runs on unsharded copies). The engine keeps its exact, single-process semantics by working
on *full* tensors where it needs the whole parameter:

* **planning** uses the global shapes (``DTensor.shape``), so a block, its factors and its
  inverses are those of the full parameter;
* **gradients**: :meth:`ShardedParams.full_grads` gathers the FSDP2 gradients (already averaged
  over the ranks by FSDP2's reduce-scatter) into plain full tensors with one bucketed
  ``all_gather`` per step (:func:`curvkit.distributed.full_tensors`), used by both the
  statistics (minibatch evidence) and the update;
* **sampled evidence** (TNT): :meth:`ShardedParams.sampled_gradients` runs the sampled backward
  into ``.grad`` (``backward(retain_graph=True)``), takes the reduce-scattered result and restores
  the user's gradients -- the "stash" recipe of the *Run distributed* page. The per-rank loss is
  scaled by the local batch size :math:`n_r`, so FSDP2's average gives
  :math:`\frac1W\sum_r n_r \bar g_r`; :meth:`ShardedParams.finish_sampled` divides by the mean
  batch size :math:`\frac1W\sum_r n_r` (one all-reduce of a scalar), which is the sampled gradient
  of the global batch, :math:`\sum_r n_r \bar g_r / \sum_r n_r`, for any batch sizes;
* **state**: statistics, inverses, momentum and preconditioner state are plain tensors of the
  block's (full) view shape, identical on every rank: the direction contracts every mode of the
  momentum, so a sharded momentum would have to be gathered at every step, and a block's view may
  join several parameters (KFAC's weight and bias), so it has no ``Shard(0)`` layout of its own.
  ``torch.distributed.checkpoint`` saves plain tensors as replicated and reshards them trivially;
* **update**: the full direction is computed on every rank from identical inputs, and each rank
  applies its own ``Shard(0)`` rows (a slice of the full direction; for other layouts
  :func:`curvkit.distributed.local_like`) to its local shard in place.

Only ``Shard(0)`` and ``Replicate`` placements (FSDP2 and HSDP) are accepted; other layouts (tensor
parallelism) are refused at construction.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from ..distributed import full_tensors, is_dtensor, local_like

__all__ = ["ShardedParams"]


class ShardedParams:
    """The FSDP2 parameters of an optimizer and the full/shard conversions the engine needs.

    Args:
        params: the DTensor parameters (every other parameter is treated as plain).
        names: ``id(param) -> name`` for messages.

    Raises:
        ValueError: for a DTensor parameter whose placements are not ``Shard(0)`` or
            ``Replicate`` (for example tensor-parallel ``Shard(1)``), naming it.
    """

    def __init__(self, params: Sequence[Tensor], names: dict[int, str] | None = None) -> None:
        from torch.distributed.tensor import Replicate, Shard

        names = names or {}
        for i, p in enumerate(params):
            bad = [pl for pl in p.placements if not (pl == Shard(0) or isinstance(pl, Replicate))]
            if bad:
                raise ValueError(
                    f"parameter {names.get(id(p), i)!r} is a DTensor with placements {tuple(p.placements)}; "
                    f"curvkit supports FSDP2's Shard(0) (and HSDP's Replicate) layouts only: shard the model "
                    f"with torch.distributed.fsdp.fully_shard, not tensor parallelism"
                )
        self.count = len(params)
        # (id, global shape, local shape) of a parameter -> (first row, rows) of its Shard(0) piece
        self._rows: dict[tuple[Any, ...], tuple[int, int] | bool] = {}

    @classmethod
    def detect(cls, params: Sequence[Tensor], names: dict[int, str] | None = None) -> "ShardedParams | None":
        """A :class:`ShardedParams` when some parameter is a DTensor, else ``None``."""
        sharded = [p for p in params if is_dtensor(p)]
        return cls(sharded, names) if sharded else None

    # ------------------------------------------------------------------ gradients
    def full_grads(self, blocks: Sequence[Any], block_ids: Sequence[int]) -> dict[int, Tensor | None]:
        """``id(p) -> full gradient`` (plain tensor; ``None`` without a gradient) for the
        parameters of ``block_ids`` (*collective*: one ``all_gather`` per dtype and mesh).

        Every rank must pass the same blocks: FSDP2 gives every rank a gradient for the same
        parameters. A DTensor parameter without a gradient next to one with a gradient in the
        same block gets full zeros (a plain tensor, never ``zeros_like`` of a DTensor)."""
        params = [p for bi in block_ids for p in blocks[bi].params]
        with_grad = [p for p in params if p.grad is not None]
        gathered = full_tensors([p.grad for p in with_grad])
        out: dict[int, Tensor | None] = {id(p): g for p, g in zip(with_grad, gathered)}
        for bi in block_ids:
            ps = blocks[bi].params
            if any(out.get(id(p)) is not None for p in ps):
                for p in ps:
                    if out.get(id(p)) is None and is_dtensor(p):
                        out[id(p)] = _full_zeros(p)
        for p in params:
            out.setdefault(id(p), None)
        return out

    def sampled_gradients(
        self,
        value: Tensor,
        params: Sequence[Tensor],
        batch: int,
        *,
        protect: Sequence[Tensor] = (),
        seed: Tensor | None = None,
    ) -> list[Tensor | None]:
        r"""The full gradient of ``batch * value`` averaged over the ranks by FSDP2 (*collective*).

        With ``seed`` (the gradient of the sampled loss in the outputs ``value``), the backward
        starts from ``value`` with ``batch * seed``. Runs the backward (``retain_graph=True``)
        with every ``.grad`` of ``params`` set aside (restored afterwards, so a user's accumulated gradients are untouched), and
        gathers the reduce-scattered result: :math:`\frac1W\sum_r n_r \bar g_r`, identical on
        every rank. :meth:`finish_sampled` turns the accumulated sum into the global mean.
        The gradients of ``protect`` (the optimizer's other parameters, which the backward also
        reaches) are set aside and restored too.
        """
        keep = list({id(p): p for p in [*params, *protect]}.values())
        saved = [p.grad for p in keep]
        for p in keep:
            p.grad = None
        try:
            with torch.enable_grad():
                value.backward(torch.full_like(value, batch) if seed is None else seed * batch, retain_graph=True)
            grads = [p.grad for p in params]
        finally:
            for p, g in zip(keep, saved):
                p.grad = g
        present = [i for i, g in enumerate(grads) if g is not None]
        full = full_tensors([grads[i] for i in present])
        out: list[Tensor | None] = [None] * len(params)
        for i, g in zip(present, full):
            out[i] = g
        return out

    @staticmethod
    def finish_sampled(pending: Sequence[Tensor], local_count: int, distributor: Any, *, step: int) -> None:
        r"""Divide the accumulated :math:`\frac1W\sum_{r,k} n_{rk} \bar g_{rk}` by the mean batch
        size over the ranks, in place: the batch-size weighted sampled gradient of the global
        batch (one all-reduce of a scalar; without a distributor, by the local count)."""
        if not pending:
            return
        first = pending[0]
        count = torch.full((), float(local_count), dtype=first.dtype, device=first.device)
        if distributor is not None and hasattr(distributor, "average_"):
            distributor.average_([count], call="update_curvature", step=step)
        torch._foreach_div_(list(pending), count)

    # ------------------------------------------------------------------ update
    def local(self, full: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        """``(target, part)``: the plain tensor to update in place for ``p`` (its local shard
        for a DTensor) and this rank's part of the full tensor ``full`` laid out like it (rows
        cut out of ``full`` for FSDP2's ``Shard(0)``, :func:`~curvkit.distributed.local_like`
        for other layouts; no communication)."""
        if not is_dtensor(p):
            return p, full
        local = p.to_local()
        key = (id(p), tuple(p.shape), tuple(local.shape))
        rows = self._rows.get(key)
        if rows is None:
            rows = self._rows[key] = _shard0_slice(p, local)
        if rows is False:
            return local, local_like(full, p).to_local()
        return local, full.narrow(0, rows[0], rows[1])

    @staticmethod
    def zeros(p: Tensor) -> Tensor:
        """Full zeros of ``p``'s global shape (a plain tensor)."""
        return _full_zeros(p)


def _shard0_slice(p: Tensor, local: Tensor) -> tuple[int, int] | bool:
    """``(first row, rows)`` of this rank's ``Shard(0)`` piece of ``p`` on a 1-D mesh (torch.chunk's
    split, as FSDP2 lays it out), or ``False`` for any other layout."""
    from torch.distributed.tensor import Shard

    from ..distributed import _shard0_rows

    mesh = p.device_mesh
    if mesh.ndim != 1 or tuple(p.placements) != (Shard(0),) or p.ndim == 0:
        return False
    rows = _shard0_rows(p.shape[0], mesh.size())
    rank = mesh.get_local_rank()
    if local.shape[0] != rows[rank]:
        return False
    return sum(rows[:rank]), rows[rank]


def _full_zeros(p: Tensor) -> Tensor:
    local = p.to_local() if is_dtensor(p) else p
    return torch.zeros(tuple(p.shape), dtype=p.dtype, device=local.device)
