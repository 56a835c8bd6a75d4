r"""The update rule, batched over groups of same-shape blocks and masked on the device.

For every block with a gradient, with :math:`g` its gradient in the block's view:

1. ``ok_g`` = every entry of :math:`g` finite (one fused ``_foreach_norm`` per dtype/device);
2. momentum :math:`M \leftarrow \mu M + (1 - d)\,g` where ``ok_g`` (unchanged otherwise), by
   ``torch._foreach_*`` over all blocks;
3. direction :math:`P` from the preconditioner, one ``apply_group`` call per group of blocks of
   equal view shape, dtype and device (of equal dtype and device, for a preconditioner that
   declares ``mixed_shapes``);
4. ``ok = ok_g`` and every entry of :math:`P` finite;
5. :math:`W \leftarrow W (1 - \eta\,\mathrm{wd}) - \eta P` where ``ok`` (each parameter with its own
   param group's :math:`\eta` and wd), by ``torch._foreach_*``.

Blocks that fail a check are left exactly as they were and counted on the device; nothing is
read on the host unless ``nonfinite="raise"``.

The work is split in two. :class:`UpdatePlan` is the Python side -- which blocks are active,
which parameters have gradients, how blocks group for the ``_foreach`` calls and for
``apply_group`` -- built once and cached while that structure stays the same.
:func:`update_step` is the tensor side: a function of the plan and of lists of tensors (and of
the hyperparameters, Python numbers or 0-d tensors) that reads nothing on the host. With
``compile_update=True`` (:class:`~curvkit.CurvatureOptimizer`) the rule runs it through
``torch.compile(fullgraph=True, dynamic=False)``, with the hyperparameters as 0-d device
tensors, so a changing learning rate does not recompile it (see :doc:`/howto/pitfalls`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..blocks import Block
from ..estimators.tensor_normal import statistics_dtype
from ..interfaces import Preconditioner
from .finite import finite_flags, scalar_tensor, zero_unless
from .health import HealthMonitor, index_tensor

__all__ = ["UpdatePlan", "UpdateRule", "update_step"]

#: One param group's ``(lr, weight_decay, momentum, 1 - dampening)``, as Python numbers (eager;
#: ``lr`` may be a 0-d tensor) or as 0-d tensors (the compiled path).
Hyper = tuple[Any, Any, Any, Any]

_MAX_PLANS = 16


def _where_scalar(mask: Tensor, yes: float, no: float, dtype: torch.dtype) -> Tensor:
    """``yes`` where ``mask`` else ``no``, exactly in ``dtype`` (no float32 rounding of the scalars)."""
    device = mask.device
    return torch.where(mask, scalar_tensor(yes, dtype, device), scalar_tensor(no, dtype, device))


def _where_one(mask: Tensor, yes: Any, dtype: torch.dtype) -> Tensor:
    """``yes`` where ``mask`` else 1, in ``dtype``; ``yes`` a Python number or a 0-d tensor."""
    if isinstance(yes, Tensor):
        return torch.where(mask, yes.to(dtype), scalar_tensor(1.0, dtype, mask.device))
    return _where_scalar(mask, yes, 1.0, dtype)


@dataclass(frozen=True, eq=False)
class UpdatePlan:
    """The Python side of one step's update (cached by :class:`UpdateRule` while it holds).

    A *slot* is one (param group, device) pair: its hyperparameters are read afresh at every
    step, so the plan survives learning-rate schedules.

    Attributes:
        blocks: the active blocks (those with at least one gradient).
        work: per block, the dtype the update works in (its statistics dtype).
        slot_groups: per slot, the position of its param group among ``groups`` of
            :meth:`UpdateRule.prepare`.
        slot_devices: per slot, its device.
        momentum_sets: ``(slot, block positions, index tensor)`` per (schedule slot, dtype) of
            blocks with momentum; the index tensor selects their ``ok_g`` flags (``None`` where
            the set is every block in order: ``ok_g`` itself).
        plain: ``(block position, slot)`` of the blocks without momentum.
        shape_groups: block positions of each group of equal view shape, dtype, device and kind
            (one ``apply_group`` call each; the view shape is left out for a preconditioner that
            declares :attr:`~curvkit.Preconditioner.mixed_shapes`).
        update_sets: ``(slot, decays, ((block position, parameter index), ...))`` per (param
            group, device, parameter dtype): the parameters with a gradient.
    """

    blocks: tuple[Block, ...]
    work: tuple[torch.dtype, ...]
    slot_groups: tuple[int, ...]
    slot_devices: tuple[torch.device, ...]
    momentum_sets: tuple[tuple[int, tuple[int, ...], Tensor | None], ...]
    plain: tuple[tuple[int, int], ...]
    shape_groups: tuple[tuple[int, ...], ...]
    update_sets: tuple[tuple[int, bool, tuple[tuple[int, int], ...]], ...]


# ---------------------------------------------------------------------------- the tensor side
def gradient_views(plan: UpdatePlan, params: Sequence[Sequence[Tensor]], grads: Sequence[Sequence[Tensor | None]]) -> tuple[Tensor, list[Tensor]]:
    """``(ok_g, safe)``: the finiteness flag of each block's gradient view, and the view in the
    working dtype with non-finite views replaced by zeros."""
    views = []
    for b, ps, gs, w in zip(plan.blocks, params, grads, plan.work):
        if len(gs) == 1:  # one parameter per block (the common case): no scans
            if gs[0] is None:
                gs = [torch.zeros_like(ps[0])]
        elif any(g is None for g in gs):
            gs = [torch.zeros_like(p) if g is None else g for p, g in zip(ps, gs)]
        v = b.to_view(gs)
        views.append(v if v.dtype == w else v.to(w))
    ok_g = finite_flags(views)
    return ok_g, zero_unless(ok_g, views)


def momentum_buffers(
    plan: UpdatePlan, momenta: Sequence[Tensor | None], safe: Sequence[Tensor], ok_g: Tensor, hyper: Sequence[Hyper]
) -> list[Tensor]:
    r""":math:`M \leftarrow \mu M + (1 - d)\,g` in place where ``ok_g`` (:math:`\mu` = 1 and
    :math:`g` = 0 elsewhere); the buffers to precondition, one per block."""
    buffers: list[Tensor | None] = list(momenta)
    for pos, slot in plan.plain:
        keep = hyper[slot][3]
        buffers[pos] = safe[pos] if not isinstance(keep, Tensor) and keep == 1.0 else safe[pos] * keep
    for slot, idx, index in plan.momentum_sets:
        mu, keep = hyper[slot][2], hyper[slot][3]
        bufs = [buffers[i] for i in idx]
        mu_eff = _where_one(ok_g if index is None else ok_g[index], mu, bufs[0].dtype)  # type: ignore[union-attr]
        torch._foreach_mul_(bufs, list(mu_eff.unbind(0)))
        if isinstance(keep, Tensor):
            torch._foreach_add_(bufs, torch._foreach_mul([safe[i] for i in idx], keep))
        else:
            torch._foreach_add_(bufs, [safe[i] for i in idx], alpha=keep)
    return buffers  # type: ignore[return-value]


def directions_of(
    plan: UpdatePlan,
    preconditioner: Preconditioner,
    pre_states: Sequence[dict[str, Any]],
    buffers: Sequence[Tensor],
    inverses: Sequence[Any],
    safe: Sequence[Tensor],
    statistics: Sequence[dict[str, Any]] | None = None,
) -> tuple[list[Tensor], Tensor]:
    """The preconditioned directions (one ``apply_group`` per shape group) and their
    finiteness flags. ``statistics`` (the estimator states) go to preconditioners that declare
    :attr:`~curvkit.Preconditioner.reads_statistics` (EKFAC's scalings)."""
    directions: list[Tensor | None] = [None] * len(plan.blocks)
    for idx in plan.shape_groups:
        extra: dict[str, Any] = {}
        if statistics is not None:
            extra["statistics"] = [statistics[i] for i in idx]
        outs = preconditioner.apply_group(
            [plan.blocks[i] for i in idx],
            [pre_states[i] for i in idx],
            [buffers[i] for i in idx],
            [inverses[i] for i in idx],
            gradients=[safe[i] for i in idx],
            **extra,
        )
        for i, d in zip(idx, outs):
            directions[i] = d
    return directions, finite_flags(directions)  # type: ignore[return-value,arg-type]


def apply_update(
    plan: UpdatePlan,
    params: Sequence[Sequence[Tensor]],
    directions: Sequence[Tensor],
    ok: Tensor,
    hyper: Sequence[Hyper],
    sharding: Any = None,
) -> None:
    r""":math:`W \leftarrow W (1 - \eta\,\mathrm{wd}) - \eta P` in place where ``ok``. Under FSDP2
    (``sharding``, a :class:`~curvkit.engine.sharding.ShardedParams`) each rank updates its
    shard with its rows of the full step."""
    oks: Sequence[Tensor] | None = None  # the flags one by one, where weight decay needs them
    parts = [b.from_view(d) for b, d in zip(plan.blocks, zero_unless(ok, directions))]
    if sharding is not None:
        local = {(i, j): sharding.local(parts[i][j], params[i][j]) for _, _, members in plan.update_sets for i, j in members}
        params = [[local[(i, j)][0] if (i, j) in local else p for j, p in enumerate(ps)] for i, ps in enumerate(params)]
        parts = [[local[(i, j)][1] if (i, j) in local else t for j, t in enumerate(ts)] for i, ts in enumerate(parts)]
    for slot, decays, members in plan.update_sets:
        lr, wd = hyper[slot][0], hyper[slot][1]
        ps = [params[i][j] for i, j in members]
        dtype = ps[0].dtype
        if decays:
            if oks is None:
                oks = ok.unbind(0)
            flags = torch.stack([oks[i] for i, _ in members])
            if isinstance(lr, Tensor) or isinstance(wd, Tensor):
                scale = torch.where(flags, (1.0 - lr * wd).to(dtype), torch.ones((), dtype=dtype, device=flags.device))
            else:
                scale = _where_scalar(flags, 1.0 - lr * wd, 1.0, dtype)
            torch._foreach_mul_(ps, list(scale.unbind(0)))
        steps = [parts[i][j] if parts[i][j].dtype == dtype else parts[i][j].to(dtype) for i, j in members]
        if isinstance(lr, Tensor):
            torch._foreach_add_(ps, torch._foreach_mul(steps, -lr))
        else:
            torch._foreach_add_(ps, steps, alpha=-lr)


def update_step(
    plan: UpdatePlan,
    preconditioner: Preconditioner,
    params: Sequence[Sequence[Tensor]],
    grads: Sequence[Sequence[Tensor | None]],
    momenta: Sequence[Tensor | None],
    pre_states: Sequence[dict[str, Any]],
    inverses: Sequence[Any],
    hyper: Sequence[Hyper],
    statistics: Sequence[dict[str, Any]] | None = None,
    sharding: Any = None,
) -> tuple[Tensor, Tensor]:
    """One step's momentum, direction and masked update over lists of tensors (no host reads).

    What :func:`torch.compile` wraps with ``compile_update=True``.

    Args:
        plan: the step's :class:`UpdatePlan`.
        preconditioner: the preconditioner part.
        params: per block, its parameters (updated in place).
        grads: per block, one gradient per parameter (``None``: none).
        momenta: per block, its momentum buffer (updated in place), ``None`` without momentum.
        pre_states: per block, the preconditioner's state.
        inverses: per block, its per-mode inverses (or ``None``).
        hyper: per slot of the plan, ``(lr, weight_decay, momentum, 1 - dampening)``.
        statistics: per block, the estimator state, for preconditioners that read it.
        sharding: FSDP2's :class:`~curvkit.engine.sharding.ShardedParams` (``None`` otherwise).

    Returns:
        ``(ok_g, ok_d)``: per block, whether its gradient was finite, and whether its direction
        was.
    """
    ok_g, safe = gradient_views(plan, params, grads)
    buffers = momentum_buffers(plan, momenta, safe, ok_g, hyper)
    directions, ok_d = directions_of(plan, preconditioner, pre_states, buffers, inverses, safe, statistics)
    apply_update(plan, params, directions, ok_g & ok_d, hyper, sharding)
    return ok_g, ok_d


# ---------------------------------------------------------------------------- the Python side
class UpdateRule:
    """Momentum, direction and parameter update for the active blocks of one step.

    Args:
        preconditioner: the preconditioner part.
        health: the health monitor (device counters of skipped blocks).
        nonfinite: ``"skip"`` or ``"raise"``.
        compile: run :func:`update_step` through ``torch.compile(fullgraph=True,
            dynamic=False)`` (needs ``nonfinite="skip"`` and a preconditioner that declares
            :attr:`~curvkit.Preconditioner.traceable`; the optimizer checks both).
    """

    #: The ``torch.compile`` backend of the compiled path.
    backend: str = "inductor"

    def __init__(self, preconditioner: Preconditioner, health: HealthMonitor, *, nonfinite: str, compile: bool = False) -> None:
        self.preconditioner = preconditioner
        self.health = health
        self.nonfinite = nonfinite
        self.compile = compile
        self._plans: dict[tuple[Any, ...], UpdatePlan] = {}
        self._hyper: dict[tuple[Any, ...], list[tuple[Tensor, ...]]] = {}
        self._compiled: Callable[..., tuple[Tensor, Tensor]] | None = None
        self.sharding: Any = None  # FSDP2: a curvkit.engine.sharding.ShardedParams

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_plans={}, _hyper={}, _compiled=None)  # rebuilt on use (hold ids and compiled code)
        return state

    # -------------------------------------------------------------- planning
    def prepare(
        self,
        blocks: Sequence[Block],
        block_ids: Sequence[int],
        states: Sequence[dict[str, Any]],
        inverses: Sequence[Any],
        group_of: Callable[[Tensor], dict[str, Any]],
        schedule_group: Sequence[dict[str, Any]],
        full_grads: dict[int, Tensor | None] | None = None,
    ) -> tuple[UpdatePlan, tuple[Any, ...]]:
        """The (cached) plan of this step and the arguments of :func:`update_step` (under FSDP2,
        ``full_grads`` holds the gathered full gradients)."""
        groups: dict[int, dict[str, Any]] = {}
        sig: list[Any] = [tuple(block_ids)]
        for b, sg in zip(blocks, schedule_group):
            groups.setdefault(id(sg), sg)
            sig.append(id(sg))
            for p in b.params:
                g = group_of(p)
                groups.setdefault(id(g), g)
                sig.append((p.grad is None, id(g), p.dtype, p.device))
        sig.extend((k, g["momentum"] != 0, bool(g["weight_decay"])) for k, g in groups.items())
        key = tuple(sig)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            plan = self._plans[key] = _build_plan(
                blocks, schedule_group, group_of, list(groups), mixed_shapes=self.preconditioner.mixed_shapes
            )
        for b, state, sg in zip(blocks, states, schedule_group):
            if sg["momentum"] != 0 and state.get("momentum") is None:
                ref = b.params[0]
                state["momentum"] = torch.zeros(b.shape, dtype=statistics_dtype(ref.dtype), device=ref.device)
        ordered = list(groups.values())
        momenta = [s.get("momentum") if sg["momentum"] != 0 else None for s, sg in zip(states, schedule_group)]
        args = (
            plan,
            self.preconditioner,
            [b.params for b in blocks],
            [tuple(p.grad for p in b.params) for b in blocks] if full_grads is None else [
                tuple(self.sharding.zeros(p) if full_grads.get(id(p)) is None else full_grads[id(p)] for p in b.params)
                for b in blocks
            ],
            momenta,
            [s["preconditioner"] for s in states],
            list(inverses),
            self._hyperparameters(plan, ordered),
            [s["estimator"] for s in states] if self.preconditioner.reads_statistics else None,
            self.sharding if full_grads is not None else None,
        )
        return plan, args

    def _hyperparameters(self, plan: UpdatePlan, groups: Sequence[dict[str, Any]]) -> list[Hyper]:
        hyper = [
            (g["lr"], g["weight_decay"], g["momentum"], 1.0 - g.get("dampening", 0.0))
            for g in (groups[gi] for gi in plan.slot_groups)
        ]
        if not self.compile:
            return hyper
        # the compiled path: 0-d float64 tensors on each slot's device, copied to the device only
        # when a value changes, so a learning-rate schedule neither recompiles nor reads the host
        floats = tuple(tuple(0.0 if isinstance(v, Tensor) else float(v) for v in h) for h in hyper)
        key = (floats, plan.slot_devices)
        rows = self._hyper.get(key)
        if rows is None:
            if len(self._hyper) >= _MAX_PLANS:
                self._hyper.clear()
            rows = [()] * len(floats)
            for device in dict.fromkeys(plan.slot_devices):
                slots = [s for s, d in enumerate(plan.slot_devices) if d == device]
                table = torch.tensor([floats[s] for s in slots], dtype=torch.float64, device=device)
                for s, row in zip(slots, table.unbind(0)):
                    rows[s] = tuple(row.unbind(0))
            self._hyper[key] = rows
        return [tuple(v if isinstance(v, Tensor) else t for v, t in zip(h, row)) for h, row in zip(hyper, rows)]  # type: ignore[misc]

    # -------------------------------------------------------------- the step
    def __call__(
        self,
        blocks: Sequence[Block],
        block_ids: Sequence[int],
        states: Sequence[dict[str, Any]],
        inverses: Sequence[Any],
        group_of: Callable[[Tensor], dict[str, Any]],
        schedule_group: Sequence[dict[str, Any]],
        step: int,
        full_grads: dict[int, Tensor | None] | None = None,
    ) -> None:
        """Apply the update to ``blocks`` (all have at least one gradient). Under FSDP2,
        ``full_grads`` holds the gathered full gradients and each rank updates its shard."""
        if not blocks:
            return
        plan, args = self.prepare(blocks, block_ids, states, inverses, group_of, schedule_group, full_grads)
        if self.nonfinite == "raise":
            ok_g, ok_d = self._checked(plan, args, step)
        elif self.compile:
            if self._compiled is None:
                self._compiled = torch.compile(update_step, fullgraph=True, dynamic=False, backend=self.backend)
            ok_g, ok_d = self._compiled(*args)
        else:
            ok_g, ok_d = update_step(*args)
        self.health.count_device(
            ("skipped_nonfinite_grad", "skipped_nonfinite_direction"),
            index_tensor(block_ids, ok_g.device),
            torch.stack([~ok_g, ok_g & ~ok_d], dim=1),
        )

    def _checked(self, plan: UpdatePlan, args: tuple[Any, ...], step: int) -> tuple[Tensor, Tensor]:
        """:func:`update_step` with the flags read on the host between its phases
        (``nonfinite="raise"``): nothing is updated after a non-finite gradient, and the
        parameters are not updated after a non-finite direction."""
        _, preconditioner, params, grads, momenta, pre_states, inverses, hyper, statistics, sharding = args
        ok_g, safe = gradient_views(plan, params, grads)
        for b, good in zip(plan.blocks, ok_g.tolist()):
            if not good:
                raise FloatingPointError(f"non-finite gradient in block {b.name!r} at step {step}")
        buffers = momentum_buffers(plan, momenta, safe, ok_g, hyper)
        directions, ok_d = directions_of(plan, preconditioner, pre_states, buffers, inverses, safe, statistics)
        for b, good in zip(plan.blocks, ok_d.tolist()):
            if not good:
                raise FloatingPointError(f"non-finite direction in block {b.name!r} at step {step}")
        apply_update(plan, params, directions, ok_g & ok_d, hyper, sharding)
        return ok_g, ok_d


def _build_plan(
    blocks: Sequence[Block],
    schedule_group: Sequence[dict[str, Any]],
    group_of: Callable[[Tensor], dict[str, Any]],
    group_ids: Sequence[int],
    *,
    mixed_shapes: bool = False,
) -> UpdatePlan:
    position = {gid: i for i, gid in enumerate(group_ids)}
    slots: dict[tuple[int, torch.device], int] = {}

    def slot_of(group: dict[str, Any], device: torch.device) -> int:
        return slots.setdefault((position[id(group)], device), len(slots))

    work = tuple(statistics_dtype(b.params[0].dtype) for b in blocks)
    device0 = blocks[0].params[0].device
    momentum: dict[tuple[int, torch.dtype], list[int]] = defaultdict(list)
    plain: list[tuple[int, int]] = []
    shapes: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    updates: dict[tuple[int, torch.dtype], list[tuple[int, int]]] = defaultdict(list)
    decays: dict[int, bool] = {}
    for i, (b, sg, w) in enumerate(zip(blocks, schedule_group, work)):
        device = b.params[0].device
        slot = slot_of(sg, device)
        if sg["momentum"] == 0:
            plain.append((i, slot))
        else:
            momentum[(slot, w)].append(i)
        shapes[(None if mixed_shapes else b.shape, w, device, b.kind)].append(i)
        for j, p in enumerate(b.params):
            if p.grad is None:
                continue
            g = group_of(p)
            s = slot_of(g, p.device)
            decays[s] = bool(g["weight_decay"])
            updates[(s, p.dtype)].append((i, j))
    return UpdatePlan(
        blocks=tuple(blocks),
        work=work,
        slot_groups=tuple(gi for gi, _ in slots),
        slot_devices=tuple(d for _, d in slots),
        momentum_sets=tuple(
            (s, tuple(idx), None if idx == list(range(len(blocks))) else index_tensor(idx, device0))
            for (s, _), idx in momentum.items()
        ),
        plain=tuple(plain),
        shape_groups=tuple(tuple(idx) for idx in shapes.values()),
        update_sets=tuple((s, decays[s], tuple(members)) for (s, _), members in updates.items()),
    )
