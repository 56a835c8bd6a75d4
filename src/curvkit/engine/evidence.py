r"""Collecting curvature evidence and feeding it to the estimator.

Three sources, as the estimator's :class:`~curvkit.EvidenceSpec` declares:

* **sampled** -- :meth:`EvidenceCollector.sampled` differentiates the batch-mean loss with targets
  sampled from the model's predictive distribution through the user's forward graph (retained for
  the user's own backward). Estimators that declare ``parameter_gradients=False`` (KFAC) get only
  the layer-output gradients, through the recorder.
* **minibatch** -- the ordinary gradient, read in ``step()``.
* **layer records** -- a :class:`~curvkit.hooks.LayerRecorder` over the block modules.

Gradient accumulation: for estimators that read parameter gradients, the sampled gradients of
several ``update_curvature`` calls before one ``step()`` are accumulated as the batch-size
weighted mean :math:`\bar g = \sum_i n_i g_i / \sum_i n_i` -- the sampled gradient of the whole
batch -- and fed once, when ``step()`` runs (or when the state is inspected).

Layer estimators that accumulate (:attr:`~curvkit.CurvatureEstimator.accumulates`, KFAC) get
the same over micro-batches: the additive :meth:`~curvkit.CurvatureEstimator.batch_statistics`
of each micro-batch are gathered while its layer records exist -- right after the sampled
backward, or, for minibatch evidence, when the next forward pass is about to replace the
records of a micro-batch whose backward ran (and in ``step()`` for the last one) -- summed, and
folded once by :meth:`~curvkit.CurvatureEstimator.fold` when ``step()`` runs.

Feeding is fault-tolerant without host reads: each block's evidence gets a device flag (finite
or not, from one fused norm per dtype and device); non-finite evidence is replaced by zeros and
the flag goes to the estimator as ``BlockEvidence.valid``, and the fault is counted
on the device.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from .._tree import tensors_in
from ..blocks import Block
from ..fisher import LossSpec, sampled_loss, sampled_output_gradient
from ..hooks import LayerRecorder
from ..interfaces import BlockEvidence, CurvatureEstimator, Source
from .finite import finite_norms, scalar_tensor, zero_each_unless_, zero_unless
from .health import MESSAGES, HealthMonitor, index_tensor
from .runstate import RunState

if TYPE_CHECKING:  # pragma: no cover
    from ..distributed import Distributor

__all__ = ["EvidenceCollector"]


class EvidenceCollector:
    """Collects evidence for the blocks and feeds the estimator.

    Args:
        estimator: the estimator part.
        blocks: the optimizer's block list (shared, grows with ``add_param_group``).
        states: ``block -> its estimator state`` accessor.
        run: the shared per-step counters.
        health: the health monitor.
        model: the model (layer estimators).
        nonfinite: ``"skip"`` or ``"raise"``.
        seed: seed of the target-sampling generators.
    """

    def __init__(
        self,
        estimator: CurvatureEstimator,
        blocks: list[Block],
        states: Callable[[Block], dict[str, Any]],
        run: RunState,
        health: HealthMonitor,
        *,
        model: torch.nn.Module | None,
        nonfinite: str,
        seed: int,
    ) -> None:
        self.estimator = estimator
        self.spec = estimator.evidence
        self.blocks = blocks
        self.states = states
        self.run = run
        self.health = health
        self.model = model
        self.nonfinite = nonfinite
        self.seed = seed
        self.generators: dict[str, torch.Generator] = {}
        self.recorder: LayerRecorder | None = None
        self.distributor: "Distributor | None" = None
        self.sync_statistics = False
        self.sharding: Any = None  # FSDP2: a curvkit.engine.sharding.ShardedParams
        self._sharded_n = 0  # FSDP2: local examples behind the pending sampled evidence
        # pending (accumulated) sampled evidence: block ids, per-param weighted sums, total count
        self._pending_ids: list[int] = []
        self._pending: dict[int, Tensor] = {}
        self._pending_n = 0
        self._pending_step = -1
        #: A weak reference to the optimizer's ``() -> block ids due for statistics now`` (set by
        #: the optimizer, not pickled; weak, so the optimizer's finaliser can run).
        self.due_blocks: Callable[[], Callable[[], list[int]] | None] | None = None
        # pending layer statistics (accumulating layer estimators): summed per block
        self._layer_sums: dict[int, dict[str, Any]] = {}
        self._layer_due: set[int] = set()
        self._layer_missing: set[int] = set()
        self._harvested_id = -1

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["recorder"] = None  # hooks are rebuilt on the (copied) model
        state["due_blocks"] = None  # the optimizer sets it again
        state["_harvested_id"] = -1
        state["generators"] = {k: g.get_state() for k, g in self.generators.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        gens = state.pop("generators")
        self.__dict__.update(state)
        self.generators = {}
        for key, gstate in gens.items():
            gen = torch.Generator(device=key)
            gen.set_state(gstate)
            self.generators[key] = gen
        self.plan_changed()

    # ------------------------------------------------------------------ plumbing
    def plan_changed(self) -> None:
        """Rebuild the layer recorder after the block list changed."""
        if not self.spec.layer_io:
            return
        if self.recorder is not None:
            self.recorder.remove()
        modules: list[torch.nn.Module] = []
        for b in self.blocks:  # every module that uses a block's parameters (tied weights: several)
            for m in tuple(getattr(b, "uses", ()) or ()) or ((b.module,) if b.module is not None else ()):
                if m is not None and m not in modules:
                    modules.append(m)
        self.recorder = LayerRecorder(modules, root=self.model, keep_outputs=self.spec.layer_outputs)
        self._harvested_id = -1
        if self.spec.source is Source.MINIBATCH and self.estimator.accumulates:
            self.recorder.on_replace(self._harvest_finished)

    def close(self) -> None:
        """Remove the recorder's hooks."""
        if self.recorder is not None:
            self.recorder.remove()
            self.recorder = None

    def generator(self, device: torch.device) -> torch.Generator:
        """The sampling generator of ``device`` (seeded from the optimizer's seed)."""
        key = str(device)
        gen = self.generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed + len(self.generators))
            self.generators[key] = gen
        return gen

    def phase(self, name: str):
        """The recorder phase context (a no-op without a recorder)."""
        return self.recorder.phase(name) if self.recorder is not None else nullcontext()

    # ------------------------------------------------------------------ sampled evidence
    def sampled(self, outputs: Tensor, loss: LossSpec, due: list[int], *, reduction: str | None, **loss_options: Any) -> bool:
        """Run the sampled backward for blocks ``due`` (accumulating over micro-batches)."""
        run = self.run
        if self.sync_statistics and hasattr(self.distributor, "check_ready"):
            self.distributor.check_ready()
        if run.stats_taken_at == run.step and not self._pending_ids and not self._layer_due:
            raise RuntimeError(
                "update_curvature was already called for this step and its evidence was already used "
                "(the state was inspected or the estimator needs layer records per call); call it once "
                "per micro-batch before step(), without inspecting the state in between"
            )
        if not isinstance(outputs, Tensor) or outputs.grad_fn is None:
            raise RuntimeError(
                "update_curvature needs the model outputs with their autograd graph: call it after the "
                "forward pass, outside torch.no_grad(), and before loss.backward()"
            )
        params = [p for bi in due for p in self.blocks[bi].params if p.requires_grad]
        if not params:
            return False
        accumulate_layers = self.spec.layer_io and self.estimator.accumulates and self.recorder is not None
        if accumulate_layers and self.recorder.forward_id == self._harvested_id:
            raise RuntimeError(
                "update_curvature was already called for this forward pass: call it once per forward "
                "(micro-batch) before its backward; several micro-batches before one step() accumulate"
            )
        root, seed = _sampled_root(outputs, loss, reduction, self.generator(outputs.device), loss_options)
        batch = int(outputs.shape[0]) if outputs.dim() > 0 else 1
        try:
            with self.estimator.capture(), self.phase("sampled"):
                if self.spec.layer_io and not self.spec.parameter_gradients and hasattr(self.recorder, "differentiate"):
                    self.recorder.differentiate(root, seed)
                    grads: Sequence[Tensor | None] = [None] * len(params)
                elif self.sharding is not None:  # FSDP2: stashed backward, gradient of batch * value
                    grads = self.sharding.sampled_gradients(root, params, batch, protect=self._all_params(), seed=seed)
                else:
                    grads = torch.autograd.grad(root, params, seed, retain_graph=True, allow_unused=True)
        except RuntimeError as exc:
            if "second time" in str(exc) or "freed" in str(exc):
                raise RuntimeError(
                    "update_curvature could not differentiate through the forward graph because it was "
                    "already freed: call opt.update_curvature(outputs, loss=...) before loss.backward()"
                ) from exc
            raise
        by_param = {id(p): g for p, g in zip(params, grads)}
        if accumulate_layers:  # layer records live for one forward: gather their sums now
            self.harvest(due, batch_size=batch)
        elif self.spec.layer_io:  # layer records are per forward: feed now
            if run.stats_taken_at == run.step:
                raise RuntimeError(
                    f"update_curvature was already called for this step; estimator {self.estimator.name!r} "
                    f"reads layer records of one forward pass, so call it once per step"
                )
            self.feed(due, by_param, batch_size=batch, owned=True)
        elif self.sharding is not None:  # FSDP2: a plain sum, divided in flush (engine/sharding.py)
            self._accumulate(due, by_param, 1)
            self._sharded_n += batch
        else:
            self._accumulate(due, by_param, batch)
        run.stats_taken_at = run.step
        return True

    def _accumulate(self, due: list[int], by_param: dict[int, Tensor | None], n: int) -> None:
        if not self._pending_ids:
            self._pending_ids = list(due)
            self._pending = {k: g for k, g in by_param.items() if g is not None}
            self._pending_n = n
            self._pending_step = self.run.step
            self.run.pending_batches = 1
            return
        total = self._pending_n + n
        if self.run.pending_batches == 1:  # first extra micro-batch: start weighted sums
            for k in self._pending:
                self._pending[k] = self._pending[k] * self._pending_n
        for k, g in by_param.items():
            if g is None:
                continue
            if k in self._pending:
                self._pending[k].add_(g, alpha=n)
            else:
                self._pending[k] = g * n
        self._pending_n = total
        self.run.pending_batches += 1

    # ------------------------------------------------------------------ layer statistics
    def harvest(self, due: Sequence[int], *, batch_size: int | None) -> bool:
        """Add the :meth:`~curvkit.CurvatureEstimator.batch_statistics` of the current layer
        records (one micro-batch) for blocks ``due`` to the pending sums; each forward pass is
        read once. Returns whether any block got statistics."""
        recorder = self.recorder
        if recorder is None or recorder.forward_id == self._harvested_id:
            return False
        self._harvested_id = recorder.forward_id
        got = False
        with torch.no_grad(), _no_autocast([self.blocks[bi] for bi in due]):
            for bi in due:
                b = self.blocks[bi]
                stats = self.estimator.batch_statistics(
                    b, self.states(b), BlockEvidence(gradients=[None] * len(b.params), layer=recorder, batch_size=batch_size)
                )
                if stats is None:
                    continue
                self._layer_due.add(bi)
                if stats is False:
                    self._layer_missing.add(bi)
                    continue
                got = True
                sums = self._layer_sums.get(bi)
                if sums is None:
                    self._layer_sums[bi] = dict(stats)
                else:
                    for key, value in stats.items():
                        if value is None:
                            continue
                        if isinstance(value, Tensor):
                            sums[key].add_(value)
                        else:
                            sums[key] = sums[key] + value
        if got:
            self.run.pending_batches += 1
        return got

    def records_read(self) -> None:
        """Mark the recorder's current records as read (``step()`` ends: they belong to it) and
        restart its count of forward passes for the next step."""
        if self.recorder is not None:
            self.recorder.forwards = 0
            self._harvested_id = self.recorder.forward_id

    def _harvest_finished(self) -> None:
        """Recorder callback before a forward replaces the records: gather a finished
        micro-batch's statistics (its backward ran) if statistics are due at this step."""
        due_blocks = None if self.due_blocks is None else self.due_blocks()
        if due_blocks is None or self.run.stats_taken_at == self.run.step:
            return
        due = [bi for bi in due_blocks() if any(p.grad is not None for p in self.blocks[bi].params)]
        if due:
            self.harvest(due, batch_size=None)

    def _fold_layers(self) -> None:
        """Fold the summed layer statistics of every micro-batch (the example-weighted mean)."""
        ids = sorted(self._layer_due)
        sums, missing = self._layer_sums, self._layer_missing
        self._layer_sums, self._layer_due, self._layer_missing = {}, set(), set()
        self.run.pending_batches = 0
        with torch.no_grad():
            for bi in ids:
                b = self.blocks[bi]
                if bi in sums:
                    self.estimator.fold(b, self.states(b), sums[bi])
                    self.run.ever_had_stats = True
                elif bi in missing:
                    self._missing(bi, b)
        folded = [bi for bi in ids if bi in sums]
        if folded:
            self._average_states(folded)

    def _missing(self, bi: int, b: Block) -> None:
        self.health.count(bi, "missing_evidence")
        self.health.warn_once(
            "missing_evidence",
            f"block {b.name!r} is planned with curvature factors but got no evidence on a "
            f"statistics step (its layer was never called through its forward, or hooks did "
            f"not fire under torch.compile); it keeps stale statistics -- see opt.block_plan()",
        )

    def flush(self, due: Sequence[int] | None = None, *, strict: bool = False) -> None:
        """Feed accumulated sampled evidence (the batch-size weighted mean) to the estimator.

        Under a distributor, ``step()`` passes the blocks ``due`` for statistics: a rank that
        collected no evidence then takes part in the average with weight zero, so the ranks make
        the same collective calls and all get the statistics of the ranks that did (a rank that
        skipped ``update_curvature`` no longer aborts or hangs the others). With ``strict``,
        every rank raises together when any rank collected nothing.
        """
        if self._layer_due:
            self._fold_layers()
        distributed = self.distributor is not None and self.sync_statistics and hasattr(self.distributor, "average_")
        missing_here = False
        if (
            not self._pending_ids and distributed and due and self.spec.source is Source.SAMPLED
            and not self.spec.layer_io and self.run.stats_taken_at != self.run.step and self.sharding is None
        ):
            params = [p for bi in due for p in self.blocks[bi].params if p.requires_grad]
            if params:
                self._pending_ids = list(due)
                self._pending = {id(p): torch.zeros_like(p) for p in params}
                self._pending_n = 0
                self.run.pending_batches = 1
                missing_here = True
        if not self._pending_ids:
            return
        ids, pending, n, batches = self._pending_ids, self._pending, self._pending_n, self.run.pending_batches
        self._pending_ids, self._pending, self._pending_n = [], {}, 0
        self.run.pending_batches = 0
        distributor = self.distributor if self.sync_statistics else None
        if self.sharding is not None:  # FSDP2: already the ranks' average; weight by batch size
            self.sharding.finish_sampled(list(pending.values()), self._sharded_n, distributor, step=self.run.step)
            self._sharded_n = 0
            self.feed(ids, pending, batch_size=n, averaged=True, owned=True)
            return
        if distributor is not None and hasattr(distributor, "average_"):
            # the global batch's sampled gradient: sum_r sum_i n_i g_i / sum_r n_r over the ranks
            if batches == 1:
                for g in pending.values():
                    g.mul_(n)
            first = next(iter(pending.values()))
            count = torch.full((), float(n), dtype=first.dtype, device=first.device)
            missing = torch.full((), float(missing_here), dtype=first.dtype, device=first.device)
            order = self._param_order  # the same parameter order on every rank (ids differ)
            keys = sorted(pending, key=lambda k: order.get(k, 0))
            distributor.average_(
                [pending[k] for k in keys] + [count, missing], call="update_curvature", step=self.run.step
            )
            if strict and bool(missing > 0):  # strict may read the host: every rank raises together
                raise RuntimeError(
                    f"a rank did not call update_curvature at step {self.run.step} while statistics were due "
                    f"(strict=True): call it on every rank"
                )
            if missing_here:
                self.health.warn_once(
                    "rank_missing",
                    f"this rank did not call update_curvature at step {self.run.step}; its statistics come "
                    f"from the ranks that did (call it on every rank where opt.statistics_due())",
                )
            for g in pending.values():
                g.div_(count)  # 0/0 where no rank collected: non-finite evidence, skipped everywhere
        elif batches > 1:
            for g in pending.values():
                g.div_(n)
        self.feed(ids, pending, batch_size=n, averaged=distributor is not None, owned=True)

    def gradients(self, grads: Sequence[Tensor | None], params: Sequence[Tensor], due: list[int]) -> None:
        """The low-level form: one curvature gradient per parameter, fed at once."""
        self.flush()
        self.feed(due, {id(p): g for p, g in zip(params, grads)})
        self.run.stats_taken_at = self.run.step

    # ------------------------------------------------------------------ the minibatch gradient
    def minibatch(self, active: Sequence[int], full_grads: dict[int, Tensor | None] | None) -> None:
        """At ``step()``, for an estimator that reads the minibatch gradient: fold it (or, for a
        layer estimator that accumulates, the recorded micro-batches) into the statistics of the
        ``active`` blocks whose statistics are due (the optimizer's ``due_blocks``), once per step.
        ``full_grads``: FSDP2's gathered gradients by parameter id (``None``: ``p.grad``).

        Counts ``partial_evidence`` (and warns once) where a layer estimator will read the
        records of the last of several forward passes only."""
        run, recorder = self.run, self.recorder
        schedule = None if self.due_blocks is None else self.due_blocks()  # the optimizer's, weakly held
        if run.stats_taken_at == run.step or schedule is None:
            return
        due = schedule()
        accumulates = self.spec.layer_io and self.estimator.accumulates
        if recorder is not None and getattr(recorder, "forwards", 0) > 1:
            # records of earlier micro-batches replaced by the last forward's: an estimator that
            # does not accumulate, or one whose after-step pairs read them on a step without statistics
            partial = list(due) if not accumulates else ([] if due or not self.spec.closure else list(active))
            for bi in partial:
                if self.blocks[bi].module is not None:
                    self.health.count(bi, "partial_evidence")
            if partial:
                self.health.warn_once("partial_evidence", _partial_message(recorder.forwards))
        due_set = set(due)
        ids = [bi for bi in active if bi in due_set]
        if not ids:
            return
        if accumulates:  # the last micro-batch's records, with the earlier ones' sums
            self.harvest(ids, batch_size=None)
        else:
            grads = {id(p): p.grad if full_grads is None else full_grads[id(p)] for bi in ids for p in self.blocks[bi].params}
            self.feed(ids, grads)
        run.stats_taken_at = run.step

    # ------------------------------------------------------------------ feeding
    def feed(
        self,
        block_ids: Sequence[int],
        grads_by_param: dict[int, Tensor | None],
        *,
        decay: float | None = None,
        batch_size: int | None = None,
        averaged: bool = False,
        owned: bool = False,
    ) -> None:
        """Fold evidence into the statistics of ``block_ids`` (fault-tolerant, no host reads).

        Under a distributor, statistics are averaged over the ranks after the update unless the
        evidence itself was already ``averaged`` (the sampled gradient of the global batch).
        ``owned`` evidence (the collector's own sampled gradients) is masked in place; other
        evidence (``p.grad``, a caller's tensors) is left as it is."""
        blocks = [self.blocks[bi] for bi in block_ids]
        get = grads_by_param.get
        evid = [[get(id(p)) for p in b.params] for b in blocks]
        owners: list[int] = []  # the block of each present gradient
        present: list[Tensor] = []
        for i, gl in enumerate(evid):
            for g in gl:
                if g is not None:
                    owners.append(i)
                    present.append(g)
        valid: list[Tensor | None] = [None] * len(blocks)
        squared: list[Tensor | None] = [None] * len(blocks)
        if present:
            flags, norms = finite_norms(present)
            if self.nonfinite == "raise":
                bad = (~flags).tolist()
                for i, b in zip(owners, bad):
                    if b:
                        raise FloatingPointError(
                            f"non-finite curvature evidence for block {blocks[i].name!r} at step {self.run.step}"
                        )
            if len(set(owners)) == len(owners):  # one tensor per block (the common case): no combining
                ok, ids = flags, owners
                if norms is not None and self.spec.squared_norms:  # 0 where not finite
                    squared_norms = torch.where(flags, norms * norms, scalar_tensor(0.0, norms.dtype, norms.device)).unbind(0)
                    for i, sq in zip(owners, squared_norms):
                        squared[i] = sq
            else:
                per_block: dict[int, Tensor] = {}
                for j, i in enumerate(owners):
                    per_block[i] = flags[j] if i not in per_block else per_block[i] & flags[j]
                ids = sorted(per_block)
                ok = torch.stack([per_block[i] for i in ids])
            self.health.count_device(
                "skipped_nonfinite_evidence", index_tensor([block_ids[i] for i in ids], ok.device), ~ok
            )
            oks = ok.unbind(0)
            for i, v in zip(ids, oks):
                valid[i] = v
            mask = zero_each_unless_ if owned else zero_unless
            if ids is owners:
                safe = iter(mask(ok, present, flag_list=oks))  # the present tensors, in their order
            else:  # each tensor takes its block's flag
                position = {i: j for j, i in enumerate(ids)}
                safe = iter(mask(ok[index_tensor([position[i] for i in owners], ok.device)], present))
            for i in ids:
                evid[i] = [None if g is None else next(safe) for g in evid[i]]
        layer = self.recorder
        layer_io = self.spec.layer_io
        states = self.states
        with _no_autocast(blocks):
            fed_ids: list[int] = []
            fed_blocks: list[Block] = []
            fed: list[BlockEvidence] = []
            for bi, b, gl, v, sq in zip(block_ids, blocks, evid, valid, squared):
                if layer_io or any(g is not None for g in gl):
                    fed_ids.append(bi)
                    fed_blocks.append(b)
                    fed.append(BlockEvidence(gradients=gl, layer=layer, batch_size=batch_size, valid=v, squared_norm=sq))
            results = self.estimator.update_group(fed_blocks, [states(b) for b in fed_blocks], fed, decay=decay)
            for bi, b, result in zip(fed_ids, fed_blocks, results):
                if result is False:
                    self._missing(bi, b)
            if fed and any(r is not False for r in results):
                self.run.ever_had_stats = True
        if not averaged:
            self._average_states(block_ids)

    def _average_states(self, block_ids: Sequence[int]) -> None:
        """Under a distributor, average the statistics of ``block_ids`` over the ranks."""
        if self.sync_statistics and self.distributor is not None:
            states = [self.states(self.blocks[bi]) for bi in block_ids]
            if hasattr(self.distributor, "average_statistics"):
                self.distributor.average_statistics(states)
            elif not self._reads_synced_gradients():
                tensors = [t for st in states for t in tensors_in(st) if t.is_floating_point()]
                self.distributor.average_(tensors, call="statistics", step=self.run.step)

    def _reads_synced_gradients(self) -> bool:
        """Minibatch-gradient estimators without layer records read ``p.grad``, which DDP has
        already averaged over the ranks: their statistics agree without a collective."""
        return self.spec.source is Source.MINIBATCH and not self.spec.layer_io

    def _all_params(self) -> list[Tensor]:  # FSDP2: whose .grad the stashed backward sets aside
        model = list(self.model.parameters()) if self.model is not None else []
        return [p for b in self.blocks for p in b.params] + model

    @property
    def _param_order(self) -> dict[int, int]:
        return {id(p): i for i, p in enumerate(p for b in self.blocks for p in b.params)}

    # ------------------------------------------------------------------ warm start
    def warm_start(
        self,
        batches: Iterable[Any],
        forward: Callable[[Any], Tensor],
        *,
        loss: LossSpec | None,
        reduction: str | None,
        max_batches: int | None,
        **loss_options: Any,
    ) -> int:
        """Statistics = their exact mean over ``batches`` at the current parameters."""
        sampled = self.spec.source is Source.SAMPLED
        if sampled and loss is None:
            raise ValueError("warm_start with sampled evidence needs loss= (for example 'cross_entropy')")
        self.flush()
        all_ids = list(range(len(self.blocks)))
        params = [p for b in self.blocks for p in b.params if p.requires_grad]
        n = 0
        for batch in batches:
            if max_batches is not None and n >= max_batches:
                break
            with torch.enable_grad():
                out = forward(batch)
                root, seed = (
                    _sampled_root(out, loss, reduction, self.generator(out.device), loss_options) if sampled else (out, None)
                )
                with self.estimator.capture(), self.phase("sampled" if sampled else "minibatch"):
                    if self.sharding is not None:  # FSDP2: rank-averaged through a stashed backward
                        grads = self.sharding.sampled_gradients(root, params, 1, seed=seed)
                    else:
                        grads = torch.autograd.grad(root, params, seed, allow_unused=True)
            self.feed(all_ids, {id(p): g for p, g in zip(params, grads)}, decay=n / (n + 1),
                      averaged=self.sharding is not None and not self.spec.layer_io)
            n += 1
        if n == 0:
            raise ValueError("warm_start got no batches")
        self.run.warm_started = self.run.step == 0
        return n


def _no_autocast(blocks: Sequence[Block]):
    """Statistics are formed in float32 (or wider) even when the caller runs under autocast."""
    if not blocks:
        return nullcontext()
    device_type = blocks[0].params[0].device.type
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # older signature without a device type
        enabled = torch.is_autocast_enabled()
    return torch.autocast(device_type=device_type, enabled=False) if enabled else nullcontext()


def _sampled_root(
    outputs: Tensor, loss: LossSpec, reduction: str | None, generator: torch.Generator, options: dict[str, Any]
) -> tuple[Tensor, Tensor | None]:
    """``(root, seed)`` of the sampled backward: the outputs and the sampled loss's gradient in
    them (closed form, :func:`~curvkit.fisher.sampled_output_gradient`) for a named likelihood;
    the sampled loss and ``None`` for a sampler callable."""
    seed = sampled_output_gradient(outputs, loss, reduction=reduction, generator=generator, **options)
    if seed is not None:
        return outputs, seed
    return sampled_loss(outputs, loss, reduction=reduction, generator=generator, **options), None


def _partial_message(forwards: int) -> str:
    """The health monitor's ``partial_evidence`` message with the number of forward passes."""
    return MESSAGES["partial_evidence"].replace("several", str(forwards), 1)
