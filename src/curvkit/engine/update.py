r"""The update rule, batched over groups of same-shape blocks and masked on the device.

For every block with a gradient, with :math:`g` its gradient in the block's view:

1. ``ok_g`` = every entry of :math:`g` finite (one fused ``_foreach_norm`` per dtype/device);
2. momentum :math:`M \leftarrow \mu M + (1 - d)\,g` where ``ok_g`` (unchanged otherwise), by
   ``torch._foreach_*`` over all blocks;
3. direction :math:`P` from the preconditioner, one ``apply_group`` call per group of blocks of
   equal view shape, dtype and device;
4. ``ok = ok_g`` and every entry of :math:`P` finite;
5. :math:`W \leftarrow W (1 - \eta\,\mathrm{wd}) - \eta P` where ``ok`` (each parameter with its own
   param group's :math:`\eta` and wd), by ``torch._foreach_*``.

Blocks that fail a check are left exactly as they were and counted on the device; nothing is
read on the host unless ``nonfinite="raise"``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..blocks import Block
from ..estimators.tensor_normal import statistics_dtype
from ..interfaces import Preconditioner
from .evidence import finite_flags
from .health import HealthMonitor, index_tensor

__all__ = ["UpdateRule"]


def _where_scalar(mask: Tensor, yes: float, no: float, dtype: torch.dtype) -> Tensor:
    """``yes`` where ``mask`` else ``no``, exactly in ``dtype`` (no float32 rounding of the scalars)."""
    return torch.full(mask.shape, yes, dtype=dtype, device=mask.device).masked_fill_(~mask, no)


def _zeros_like_scalar(t: Tensor) -> Tensor:
    return torch.zeros((), dtype=t.dtype, device=t.device)


class UpdateRule:
    """Momentum, direction and parameter update for the active blocks of one step."""

    def __init__(self, preconditioner: Preconditioner, health: HealthMonitor, *, nonfinite: str) -> None:
        self.preconditioner = preconditioner
        self.health = health
        self.nonfinite = nonfinite
        self.sharding: Any = None  # FSDP2: a curvkit.engine.sharding.ShardedParams

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
        work = [statistics_dtype(b.params[0].dtype) for b in blocks]
        grad_of = (lambda p: p.grad) if full_grads is None else (lambda p: full_grads.get(id(p)))
        grads = [
            b.to_view([(torch.zeros_like(p) if full_grads is None else self.sharding.zeros(p)) if grad_of(p) is None
                       else grad_of(p) for p in b.params]).to(w)
            for b, w in zip(blocks, work)
        ]
        ok_g = finite_flags(grads)
        if self.nonfinite == "raise":
            for b, good in zip(blocks, ok_g.tolist()):
                if not good:
                    raise FloatingPointError(f"non-finite gradient in block {b.name!r} at step {step}")
        device = ok_g.device
        ids = index_tensor(block_ids, device)
        self.health.count_device("skipped_nonfinite_grad", ids, ~ok_g)
        safe = [torch.where(ok_g[i], g, _zeros_like_scalar(g)) for i, g in enumerate(grads)]

        # momentum, grouped by (mu, keep): M <- mu_eff M + keep g_safe, mu_eff = mu where ok else 1
        buffers: list[Tensor] = []
        by_coeffs: dict[tuple[float, float], list[int]] = defaultdict(list)
        for i, (b, state) in enumerate(zip(blocks, states)):
            group = schedule_group[i]
            mu, keep = group["momentum"], 1.0 - group.get("dampening", 0.0)
            if mu == 0:
                buffers.append(safe[i] if keep == 1.0 else safe[i] * keep)
                continue
            if state.get("momentum") is None:
                state["momentum"] = torch.zeros_like(safe[i])
            buffers.append(state["momentum"])
            by_coeffs[(mu, keep)].append(i)
        for (mu, keep), idx in by_coeffs.items():
            bufs = [buffers[i] for i in idx]
            mu_eff = _where_scalar(ok_g[index_tensor(idx, device)], mu, 1.0, bufs[0].dtype)
            torch._foreach_mul_(bufs, list(mu_eff.unbind(0)))
            torch._foreach_add_(bufs, [safe[i] for i in idx], alpha=keep)

        # directions, one apply_group per group of equal view shape, dtype, device
        directions: list[Tensor | None] = [None] * len(blocks)
        shape_groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for i, b in enumerate(blocks):
            shape_groups[(b.shape, buffers[i].dtype, buffers[i].device, b.kind)].append(i)
        for idx in shape_groups.values():
            # --- seam: preconditioners that read the estimator's statistics (EKFAC) ---
            extra: dict[str, Any] = {}
            if self.preconditioner.reads_statistics:
                extra["statistics"] = [states[i]["estimator"] for i in idx]
            # --- end seam ---
            outs = self.preconditioner.apply_group(
                [blocks[i] for i in idx],
                [states[i]["preconditioner"] for i in idx],
                [buffers[i] for i in idx],
                [inverses[i] for i in idx],
                gradients=[safe[i] for i in idx],
                **extra,
            )
            for i, d in zip(idx, outs):
                directions[i] = d
        ok_d = finite_flags(directions)  # type: ignore[arg-type]
        if self.nonfinite == "raise":
            for b, good in zip(blocks, ok_d.tolist()):
                if not good:
                    raise FloatingPointError(f"non-finite direction in block {b.name!r} at step {step}")
        self.health.count_device("skipped_nonfinite_direction", ids, ok_g & ~ok_d)
        ok = ok_g & ok_d

        # parameter update, grouped by (lr, wd, dtype)
        params_by: dict[tuple[Any, ...], list[tuple[Tensor, Tensor, Tensor]]] = defaultdict(list)
        lr_of: dict[tuple[Any, ...], Any] = {}
        for i, b in enumerate(blocks):
            d = directions[i]
            parts = b.from_view(torch.where(ok[i], d, _zeros_like_scalar(d)))
            for p, part in zip(b.params, parts):
                if p.grad is None:
                    continue
                group = group_of(p)
                lr, wd = group["lr"], group["weight_decay"]
                key = (id(lr) if isinstance(lr, Tensor) else lr, wd, p.dtype, p.device)
                lr_of[key] = lr
                target, part = (p, part) if self.sharding is None else self.sharding.local(part, p)  # FSDP2 shard
                params_by[key].append((target, part.to(p.dtype), ok[i]))
        for key, items in params_by.items():
            wd = key[1]
            ps = [p for p, _, _ in items]
            lr = lr_of[key]
            if wd:
                oks = torch.stack([o for _, _, o in items])
                if isinstance(lr, Tensor):
                    scale = torch.where(oks, (1.0 - lr * wd).to(ps[0].dtype), torch.ones((), dtype=ps[0].dtype, device=oks.device))
                else:
                    scale = _where_scalar(oks, 1.0 - lr * wd, 1.0, ps[0].dtype)
                torch._foreach_mul_(ps, list(scale.unbind(0)))
            steps = [part for _, part, _ in items]
            if isinstance(lr, Tensor):
                torch._foreach_add_(ps, torch._foreach_mul(steps, -lr))
            else:
                torch._foreach_add_(ps, steps, alpha=-lr)
