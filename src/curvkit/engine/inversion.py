r"""Refreshing the inverses of the blocks that are due, with the step's one host read.

An inversion step (:math:`t \bmod T_2 = 0`) is the only step that reads tensor values on the
host. :class:`Inversions` makes that one read count:

1. every due factor's inversion is launched (:func:`~curvkit.safeguards.start_inversions`:
   batched per size, nothing read yet);
2. one read (:func:`~curvkit.engine.health.read_together`) brings back, per device, the
   finiteness of the due blocks' statistics and momentum, of this step's gradients, of every
   inversion result, and the health counters;
3. statistics that are not finite are restarted (their block keeps its last good inverses: the
   fresh results are dropped), momentum that is not finite is reset, results that are not finite
   go to the fallbacks of :func:`~curvkit.safeguards.finish_inversions` (which read again, on
   that rare path only), and the pending warnings are emitted.

Under :mod:`torch.distributed` with ``divide_inverses``, each factor is owned by one rank
(balanced by its cost :math:`d^3` at first use); the owners invert and one collective shares the
results (and their fallback counts).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from .._tree import tensors_in
from ..blocks import Block
from ..interfaces import CurvatureEstimator, Inverter
from ..operators import EigenBasis
from ..safeguards import INVERSION_COUNTERS, InversionRequest, finish_inversions, invert_all, start_inversions
from .finite import finite_flags
from .health import MESSAGES, HealthMonitor, read_together
from .runstate import RunState
from .states import BlockStates

__all__ = ["Inversions"]


class Inversions:
    """Repairs non-finite state and refreshes the inverses of due blocks (one host read).

    Args:
        estimator: gives each block's factors (:meth:`~curvkit.CurvatureEstimator.factors`).
        inverter: inverts them.
        blocks: the optimizer's block list (shared: blocks added later are seen).
        states: the block-state store.
        health: the health counters.
        run: the run counters (the step index names collectives).
        distributor: the :class:`~curvkit.distributed.Distributor`, or ``None`` in one process.
        divide: with a distributor, each factor is inverted by one rank and shared.
        sharding: FSDP2's :class:`~curvkit.engine.sharding.ShardedParams`, or ``None``.
    """

    def __init__(
        self,
        estimator: CurvatureEstimator,
        inverter: Inverter,
        blocks: list[Block],
        states: BlockStates,
        health: HealthMonitor,
        run: RunState,
        *,
        distributor: Any = None,
        divide: bool = False,
        sharding: Any = None,
    ) -> None:
        self.estimator = estimator
        self.inverter = inverter
        self.blocks = blocks
        self.states = states
        self.health = health
        self.run = run
        self.distributor = distributor
        self.divide = divide
        self.sharding = sharding
        #: The rank that inverts each factor ``(block, mode)`` (``divide`` only; built at first use).
        self.owners: dict[tuple[int, int], int] = {}

    # ------------------------------------------------------------------ the inversion step
    def refresh(self, block_ids: Sequence[int], param_groups: Sequence[dict[str, Any]]) -> bool:
        """Repair and invert the factors of ``block_ids`` with one host read per device.

        The inversions run first, on every due factor; one read then gives the finiteness of
        the statistics and momentum (:meth:`state_checks`), of every result, and the health
        counters. Blocks whose statistics were not finite are restarted and keep their last
        good inverses (their fresh results are dropped, not retried); results that are not
        finite go to the fallbacks of :func:`~curvkit.safeguards.finish_inversions` (which
        read the host again, on that rare path only). The divided path repairs first, then
        inverts and shares.

        Args:
            block_ids: the blocks whose inverses are due.
            param_groups: the optimizer's param groups (each block's ``damping``; the gradients).

        Returns:
            ``True`` when there was nothing to invert (an estimator that maintains its
            inverses, K-BFGS): the step's one read then comes after the update
            (:meth:`repair` with ``sync=True``), so it also sees that update's faults.
        """
        if self.divide and self.inverter.produces in ("matrix", "eigenbasis"):
            repaired, _ = self.repair(block_ids)
            requests, _ = self.requests(block_ids, param_groups, skip=repaired)
            if requests:
                self._invert_divided(requests)
            self.health.sync()
            return False
        checks, tensors = self.state_checks(block_ids)
        state_flags = finite_flags(tensors) if tensors else None
        requests, previous = self.requests(block_ids, param_groups)
        if not requests:
            return True
        pending = start_inversions(self.inverter, requests)
        grads_ok = self._gradients_finite(param_groups)
        n = len(pending.flags)
        state_ok, grads_ok_value, *values = read_together(
            [state_flags, grads_ok, *pending.flags, *self.health.device_tensors()]
        )
        if grads_ok_value == [0]:  # this step's update will skip a block (counted there): warn now
            self.health.warn_once("skipped_nonfinite_grad", MESSAGES["skipped_nonfinite_grad"])
        repaired = self._apply_repairs(checks, tensors, state_ok or [])
        for bi in repaired:  # restarted statistics: keep the last good inverses until new evidence
            if bi in previous:
                self.states(self.blocks[bi])["inverses"] = previous[bi]
        results = finish_inversions(self.inverter, pending, values[:n], self.health, leave_out=set(repaired))
        self._store(results)
        self.health.sync(values=values[n:])
        return False

    # ------------------------------------------------------------------ repairs
    def state_checks(self, block_ids: Sequence[int]) -> tuple[list[tuple[int, str]], list[Tensor]]:
        """The tensors whose finiteness :meth:`repair` checks: every floating statistic (unless
        the estimator heals its own) and the momentum of ``block_ids``, each with its
        ``(block, "statistics" | "momentum")``."""
        checks: list[tuple[int, str]] = []
        tensors: list[Tensor] = []
        for bi in block_ids:
            state = self.states(self.blocks[bi])
            if not self.estimator.heals_statistics:
                for t in tensors_in(state["estimator"]):
                    if t.is_floating_point() and t.numel():
                        checks.append((bi, "statistics"))
                        tensors.append(t)
            momentum = state.get("momentum")
            if isinstance(momentum, Tensor) and momentum.numel():
                checks.append((bi, "momentum"))
                tensors.append(momentum)
        return checks, tensors

    def repair(self, block_ids: Sequence[int], *, sync: bool = False) -> tuple[list[int], bool]:
        """Restart non-finite statistics and reset non-finite momentum of ``block_ids`` (one
        host read for all of them; with ``sync`` the health counters come back in the same read
        and pending warnings are emitted).

        Returns:
            The ids of the blocks repaired, and whether the host read anything.
        """
        checks, tensors = self.state_checks(block_ids)
        counters = self.health.device_tensors() if sync else []
        if not tensors and not counters:
            return [], False
        values = read_together([finite_flags(tensors) if tensors else None, *counters])
        repaired = self._apply_repairs(checks, tensors, values[0] or [])
        if sync:
            self.health.sync(values=values[1:])
        return repaired, True

    def _apply_repairs(self, checks: Sequence[tuple[int, str]], tensors: Sequence[Tensor], flags: Sequence[int]) -> list[int]:
        """Restart the statistics and reset the momentum that ``flags`` (the host values of
        :func:`~curvkit.engine.finite.finite_flags` of ``tensors``) say are not finite (a
        tensor whose norm merely overflowed is confirmed entry by entry); the ids repaired."""
        bad = {
            (bi, what) for (bi, what), ok, t in zip(checks, flags, tensors)
            if not ok and not bool(torch.isfinite(t).all())
        }
        repaired = []
        for bi in dict.fromkeys(bi for bi, _ in checks):
            b = self.blocks[bi]
            state = self.states(b)
            if (bi, "statistics") in bad:
                state["estimator"] = self.estimator.init_state(b)
                self.health.count(bi, "statistics_restarted")
            if (bi, "momentum") in bad:
                state["momentum"].zero_()
                self.health.count(bi, "momentum_reset")
            if (bi, "statistics") in bad or (bi, "momentum") in bad:
                repaired.append(bi)
        return repaired

    def _gradients_finite(self, param_groups: Sequence[dict[str, Any]]) -> Tensor | None:
        """Whether every gradient of this step is finite, as one 0-d bool on the device (read with
        the inversion flags, so that a gradient fault of a step that inverts is warned about in
        that step; the update counts it). ``None`` under FSDP2 or with gradients on several devices."""
        if self.sharding is not None:
            return None
        grads = [p.grad for g in param_groups for p in g["params"] if p.grad is not None]
        if not grads or len({t.device for t in grads}) != 1:
            return None
        return finite_flags(grads).all()

    # ------------------------------------------------------------------ requests and results
    def requests(
        self, block_ids: Sequence[int], param_groups: Sequence[dict[str, Any]], *, skip: Sequence[int] = ()
    ) -> tuple[list[InversionRequest], dict[int, Any]]:
        """The factors of ``block_ids`` to invert (none for an estimator whose factors are
        already inverses), and each requesting block's inverses before this refresh. A block
        in ``skip`` (restarted statistics) keeps its inverses when it has some."""
        requests = []
        previous_of: dict[int, Any] = {}
        for bi in block_ids:
            b = self.blocks[bi]
            state = self.states(b)
            if bi in skip and state["inverses"] is not None:
                continue
            factors = self.estimator.factors(b, state["estimator"], damping=param_groups[b.group]["damping"])
            if factors is None or self.estimator.factors_are_inverses:  # the latter: read at every step
                continue
            previous = state["inverses"]
            previous_of[bi] = previous
            for mode, f in enumerate(factors):
                if f is not None:
                    prev = previous[mode] if previous is not None and mode < len(previous) else None
                    requests.append(InversionRequest((bi, mode), f, b.order, prev))
            kept = list(previous) if previous is not None else []
            state["inverses"] = (kept + [None] * len(factors))[: len(factors)]
            for mode, f in enumerate(factors):
                if f is None:
                    state["inverses"][mode] = None
        return requests, previous_of

    def _store(self, results: dict[tuple[int, int], Any]) -> None:
        """Put fresh inverses in the block states (eigenbases versioned once per refresh)."""
        refreshed: set[int] = set()
        for (bi, mode), inv in results.items():
            state = self.states(self.blocks[bi])
            if isinstance(inv, tuple):  # an eigenbasis inverter: (vectors, values)
                if bi not in refreshed:
                    refreshed.add(bi)
                    state["inverse_version"] = state.get("inverse_version", 0) + 1
                inv = EigenBasis(inv[0].contiguous(), inv[1].contiguous(), state["inverse_version"])
            elif isinstance(inv, Tensor):  # row-major, as a checkpoint restores it: same products
                inv = inv.contiguous()
            state["inverses"][mode] = inv

    # ------------------------------------------------------------------ divided among ranks
    def owner(self, key: tuple[int, int]) -> int:
        """The rank that inverts factor ``key`` = (block, mode), balanced by cost at first use."""
        if key not in self.owners:
            from ..distributed import inverse_cost

            units = [(bi, m) for bi, b in enumerate(self.blocks) for m, f in enumerate(b.factored) if f]
            owners = self.distributor.assign([inverse_cost(self.blocks[bi].shape[m]) for bi, m in units])
            self.owners = dict(zip(units, owners))
        return self.owners.get(key, 0)

    def _invert_divided(self, requests: Sequence[InversionRequest]) -> None:
        """Each rank inverts the factors it owns; one collective shares every result."""
        rank = self.distributor.rank
        owners = [self.owner(r.key) for r in requests]
        mine = [r for r, o in zip(requests, owners) if o == rank]
        before = [[h[c] for c in INVERSION_COUNTERS] for h in self.health.host]
        results = invert_all(self.inverter, mine, self.health) if mine else {}
        if requests:
            self._share_counts(before, requests[0].factor.matrix.device)
        if self.inverter.produces == "eigenbasis":  # owner's (vectors, values), shared; versions as one refresh
            from ..distributed import share_eigenbases

            sizes = [(r.factor.matrix.shape[-1], r.factor.matrix.dtype, r.factor.matrix.device) for r in requests]
            bases = share_eigenbases(self.distributor, sizes, owners, [results.get(r.key) for r in requests],
                                     step=self.run.step)
            for bi in dict.fromkeys(r.key[0] for r in requests):
                state = self.states(self.blocks[bi])
                state["inverse_version"] = state.get("inverse_version", 0) + 1
            for r, (q, lam) in zip(requests, bases):
                state = self.states(self.blocks[r.key[0]])
                state["inverses"][r.key[1]] = EigenBasis(q, lam, state["inverse_version"])
            return
        shared = []
        for r in requests:
            m = r.factor.matrix
            inv = results.get(r.key)
            if r.key in results and inv is None:  # identity on this mode, shared as a matrix
                inv = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
            shared.append(inv.contiguous() if inv is not None else torch.zeros_like(m))
        self.distributor.share_(shared, owners, call="invert", step=self.run.step)
        for r, inv in zip(requests, shared):
            self.states(self.blocks[r.key[0]])["inverses"][r.key[1]] = inv

    def _share_counts(self, before: list[list[int]], device: torch.device) -> None:
        """Owners count their inversion fallbacks; one small all-reduce (on a step that reads the
        host anyway) gives every rank the sum, so ``health()`` and its warnings agree on every
        rank."""
        health = self.health
        delta = torch.tensor(
            [[h[c] - b for c, b in zip(INVERSION_COUNTERS, row)] for h, row in zip(health.host, before)],
            dtype=torch.int64, device=device,
        )
        self.distributor.sum_(delta, call="inversion_counts", step=self.run.step)
        for h, start, row in zip(health.host, before, delta.tolist()):
            for c, b, d in zip(INVERSION_COUNTERS, start, row):
                if d and h[c] == b:  # another rank's fallback: warn here too
                    health.warn_once(c, MESSAGES[c])
                h[c] = b + d
