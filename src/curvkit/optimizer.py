r"""The composed optimizer: drives an estimator, an inverter and a preconditioner per block.

Per block (one parameter tensor by default), with step index :math:`t` counting completed
:meth:`~CurvatureOptimizer.step` calls from 0:

1. statistics are due when :math:`t \bmod T_1 = 0` (``curvature_every``); the evidence comes from
   :meth:`~CurvatureOptimizer.update_curvature` (sampled targets) or from the minibatch gradient
   in :meth:`~CurvatureOptimizer.step`, as the estimator declares;
2. inverses are due when :math:`t \bmod T_2 = 0` (``invert_every``), and on every statistics step
   while :math:`t < T_2`;
3. momentum :math:`M \leftarrow \mu M + (1 - d)\, g` from :math:`M = 0` (dampening :math:`d`,
   0 by default: :math:`M \leftarrow \mu M + g`);
4. direction :math:`P` = the preconditioner applied to :math:`M`;
5. :math:`W \leftarrow W (1 - \eta\,\mathrm{wd}) - \eta P` (decoupled weight decay).

The work is split among collaborators with one job each (:mod:`curvkit.engine`): evidence
collection, the inversion step, the update rule, health counters, the run counters and the
checkpoint layout;
:meth:`~CurvatureOptimizer.step` is their orchestration. A step with no inversion due reads no
tensor value on the host; faults are masked and counted on the device (see :meth:`health`).
"""

from __future__ import annotations

from contextlib import nullcontext

import weakref
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from .blocks import Block, BlockPlan
from .config import check_choice, check_positive_int
from .engine import checkpoint
from .engine.evidence import EvidenceCollector
from .engine.inversion import Inversions
from .engine.health import HealthMonitor
from .engine.params import GROUP_OPTIONS, check_parameter, normalise_params, validate_group_options
from .engine.runstate import RunState
from .engine.sharding import ShardedParams
from .engine.states import BlockStates
from .engine.update import UpdateRule
from .fisher import LossSpec
from .interfaces import CurvatureEstimator, Inverter, Preconditioner, Source

__all__ = ["CurvatureOptimizer"]


class CurvatureOptimizer(torch.optim.Optimizer):
    r"""A :class:`torch.optim.Optimizer` composed of a curvature estimator, an inverter and a
    preconditioner.

    Usually built by :func:`curvkit.compose` or a preset such as :func:`curvkit.TNT`.

    Args:
        params: an ``nn.Module`` (its named parameters), parameters, ``(name, parameter)``
            pairs, or param-group dicts (which may override any of ``lr, momentum, dampening,
            weight_decay, damping, curvature_every, invert_every``).
        estimator: the curvature estimator part.
        preconditioner: the preconditioner part.
        inverter: the inverter part.
        lr: learning rate :math:`\eta`.
        momentum: momentum :math:`\mu` applied before preconditioning (0 disables it).
        dampening: :math:`d` in :math:`M \leftarrow \mu M + (1 - d) g`, the buffer starting at
            zero (unlike :class:`torch.optim.SGD`, the first step is dampened too, so with
            :math:`d = \mu` the buffer is an exponential average of the gradients, as in the
            K-BFGS authors' code).
        weight_decay: decoupled weight decay (the parameter is scaled by :math:`1 - \eta\,wd`).
        damping: damping :math:`\epsilon` handed to the inverter with each factor.
        curvature_every: :math:`T_1`, steps between statistics updates.
        invert_every: :math:`T_2`, steps between inversions (plus every statistics step while
            :math:`t < T_2`).
        max_factor_dim: modes larger than this get no dense factor (identity); ``None`` = no
            limit.
        model: the model (needed by layer-based estimators; also names the blocks). When
            ``params`` is a module it is the model.
        nonfinite: ``"skip"`` (skip the update or statistics of a block whose gradient/evidence is
            not finite, masked on the device and counted in :meth:`health`) or ``"raise"``
            (:class:`FloatingPointError`; this reads flags on the host every step).
        seed: seed of the optimizer's own generator for target sampling (default: drawn from
            torch's global generator at construction, so ``torch.manual_seed`` controls it).
        sync_statistics: under :mod:`torch.distributed`, average the updated statistics over all
            ranks after every statistics update (one all-reduce per update), so every rank holds
            the statistics of the global batch and the replicas stay identical. Exact for
            estimators whose statistics are linear in the evidence (EMAs of Grams or covariances:
            TNT, Shampoo, KFAC); refused for the others.
        loss: the likelihood used by the closure form of :meth:`step` and as the default of
            :meth:`update_curvature` (for example ``"cross_entropy"``).
        strict: raise instead of warning when statistics are due but :meth:`step` finds no new
            evidence (stale curvature), and when a loaded state holds non-finite values.
        process_group: the :mod:`torch.distributed` group of the data-parallel replicas
            (default: the whole world).
        distributed: ``None`` (default) = on when a process group with more than one rank is
            initialised at construction. Then, for every method, the replicas see the curvature
            of the global batch and stay identical: sampled gradients (TNT) are averaged over the
            ranks before they are used (weighted by batch size), layer statistics (KFAC) are
            averaged after each update, and minibatch gradients are taken as DDP averaged them.
            An estimator whose statistics are not linear in the evidence (K-BFGS) is refused
            unless ``distributed=False`` (each rank then keeps its own factors and the replicas
            drift apart: only for experiments).
        divide_inverses: with ``distributed`` on, each factor's inversion is owned by one rank
            (assigned at plan time, balanced by cost :math:`d^3`) and the results are shared with
            one collective per inversion step.
        compile_update: run the momentum, direction and masked update of every step through
            ``torch.compile(fullgraph=True, dynamic=False)`` (:func:`curvkit.engine.update.update_step`;
            the first step compiles, a change of the active blocks or of the param-group layout
            recompiles, a learning-rate schedule does not). Needs ``nonfinite="skip"`` and a
            preconditioner that declares :attr:`~curvkit.Preconditioner.traceable`
            (``kronecker_mode``, which TNT, KFAC, Shampoo and K-BFGS use). See
            :doc:`/howto/pitfalls`.
    """

    def __init__(
        self,
        params: Iterable[Any] | nn.Module,
        *,
        estimator: CurvatureEstimator,
        preconditioner: Preconditioner,
        inverter: Inverter,
        lr: float = 1e-3,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        damping: float = 1e-3,
        curvature_every: int = 1,
        invert_every: int = 20,
        max_factor_dim: int | None = 4096,
        model: nn.Module | None = None,
        nonfinite: str = "skip",
        seed: int | None = None,
        sync_statistics: bool = False,
        loss: LossSpec | None = None,
        strict: bool = False,
        process_group: Any = None,
        distributed: bool | None = None,
        divide_inverses: bool = True,
        compile_update: bool = False,
    ) -> None:
        for name, part, kind in (
            ("estimator", estimator, CurvatureEstimator),
            ("preconditioner", preconditioner, Preconditioner),
            ("inverter", inverter, Inverter),
        ):
            if not isinstance(part, kind):
                raise ValueError(f"{name} must be a {kind.__name__}, got {type(part).__name__}")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, damping=damping,
            curvature_every=curvature_every, invert_every=invert_every,
        )
        validate_group_options(defaults)
        check_positive_int("max_factor_dim", max_factor_dim, allow_none=True)
        check_choice("nonfinite", nonfinite, ("skip", "raise"))
        if isinstance(params, nn.Module):
            if model is not None and model is not params:
                raise ValueError("params is a module and model= is another module: pass one model")
            model = params
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        if not isinstance(sync_statistics, bool):
            raise ValueError(f"sync_statistics must be a bool, got {sync_statistics!r}")
        if not isinstance(strict, bool):
            raise ValueError(f"strict must be a bool, got {strict!r}")
        _check_compile_update(compile_update, nonfinite, preconditioner)
        if sync_statistics and not estimator.linear_statistics:
            raise ValueError(
                f"sync_statistics=True averages statistics across ranks, which is exact only for "
                f"estimators whose statistics are linear in the evidence; {estimator.name!r} is not"
            )
        if estimator.factors_are_inverses and inverter.name != "identity":
            raise ValueError(
                f"estimator {estimator.name!r} maintains inverse factors directly, so inverting them "
                f"again would be wrong: compose it with inverter='identity' (got {inverter.name!r})"
            )
        if estimator.evidence.layer_io and model is None:
            raise ValueError(
                f"estimator {estimator.name!r} needs layer inputs and output gradients: pass model=<your nn.Module>"
            )
        self.estimator = estimator
        self.preconditioner = preconditioner
        self.inverter = inverter
        self.max_factor_dim = max_factor_dim
        self.model = model
        self.nonfinite = nonfinite
        self.sync_statistics = sync_statistics
        self.default_loss = loss
        self.strict = strict
        self._evidence = estimator.evidence
        self._blocks: list[Block] = []
        self._param_names: dict[int, str] = {}
        if model is not None:
            self._param_names = {id(p): n for n, p in model.named_parameters()}
        groups = normalise_params(params, self._param_names)
        super().__init__(groups, defaults)
        self._seed = int(torch.randint(0, 2**62, (), generator=None).item()) if seed is None else seed
        self._run = RunState()
        self._health = HealthMonitor()
        self._states = BlockStates(self.state, estimator, preconditioner)
        self._collector = EvidenceCollector(
            estimator, self._blocks, self._states.estimator_state, self._run, self._health,
            model=model, nonfinite=nonfinite, seed=self._seed,
        )
        self._collector.due_blocks = weakref.WeakMethod(self._due_blocks)
        self._distributor = self._make_distributor(process_group, distributed, sync_statistics)
        self._collector.sync_statistics = sync_statistics or self._distributor is not None
        if sync_statistics and self._distributor is None:
            from .engine.sync import StatisticsAverager

            self._collector.distributor = StatisticsAverager(process_group)
        else:
            self._collector.distributor = self._distributor
        self._update = UpdateRule(preconditioner, self._health, nonfinite=nonfinite, compile=compile_update)
        # FSDP2: DTensor parameters are worked on as full tensors (curvkit.engine.sharding)
        self._sharding = ShardedParams.detect([p for g in self.param_groups for p in g["params"]], self._param_names)
        self._collector.sharding = self._update.sharding = self._sharding
        self._inversions = Inversions(
            estimator, inverter, self._blocks, self._states, self._health, self._run,
            distributor=self._distributor, divide=bool(divide_inverses) and self._distributor is not None,
            sharding=self._sharding,
        )
        self._used_grads: dict[int, tuple[weakref.ref, int]] = {}
        self._build_plan()
        self._finalizer = weakref.finalize(self, EvidenceCollector.close, self._collector)

    # ------------------------------------------------------------------ construction helpers
    def _make_distributor(self, process_group: Any, distributed: bool | None, sync_statistics: bool) -> Any:
        """A :class:`~curvkit.distributed.Distributor` when replicas must agree, else ``None``."""
        import torch.distributed as dist

        if distributed is not None and not isinstance(distributed, bool):
            raise ValueError(f"distributed must be None, True or False, got {distributed!r}")
        ready = dist.is_available() and dist.is_initialized()
        if distributed is False or (distributed is None and not ready):
            return None
        if not ready:
            raise ValueError(
                "distributed=True needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group) before the optimizer is built"
            )
        from .distributed import make_distributor

        distributor = make_distributor(process_group)
        if distributor.world_size < 2 and not sync_statistics:
            return None
        if not self.estimator.linear_statistics and self.estimator.evidence.layer_io:
            raise ValueError(
                f"estimator {self.estimator.name!r} keeps statistics that are not linear in the evidence, "
                f"so they cannot be averaged over the {distributor.world_size} ranks of the process group "
                f"and the replicas would drift apart: pass distributed=False to keep per-rank factors anyway "
                f"(an experiment, not data parallelism), or use a method with linear statistics (TNT, KFAC, Shampoo)"
            )
        return distributor

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        param_group = dict(param_group)
        raw = param_group.get("params")
        if isinstance(raw, Tensor):
            raw = [raw]
        names = getattr(self, "_param_names", {})
        if raw is not None:
            raw = list(raw.parameters()) if isinstance(raw, nn.Module) else list(raw)
            for i, p in enumerate(raw):
                check_parameter(p, repr(names.get(id(p), f"{i} of the new group")))
            param_group["params"] = raw
        validate_group_options({k: v for k, v in param_group.items() if k in GROUP_OPTIONS})
        super().add_param_group(param_group)
        if hasattr(self, "_health"):  # after construction: plan the new group's parameters
            self._build_plan(only_group=len(self.param_groups) - 1)

    def _build_plan(self, only_group: int | None = None) -> None:
        named = []
        for gi, group in enumerate(self.param_groups):
            if only_group is not None and gi != only_group:
                continue
            for i, p in enumerate(group["params"]):
                named.append((self._param_names.get(id(p), f"group{gi}.param{i}"), p, gi))
        blocks = self.estimator.plan(named, model=self.model, max_factor_dim=self.max_factor_dim)
        covered = [id(p) for b in blocks for p in b.params]
        expected = [id(p) for _, p, _ in named]
        if sorted(covered) != sorted(expected):
            raise ValueError(
                f"estimator {self.estimator.name!r} planned blocks that do not cover every parameter exactly once"
            )
        for b in blocks:
            if b.numel == 0:  # a zero-element parameter: nothing to precondition
                b.factored = tuple(False for _ in b.shape)
                b.rule = (b.rule + ", " if b.rule else "") + "no elements: plain momentum"
        self._blocks.extend(blocks)
        self._health.add_blocks([b.name for b in blocks])
        self._group_of_param = {id(p): gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        self._shapes = [tuple(tuple(p.shape) for p in b.params) for b in self._blocks]
        self._collector.plan_changed()
        for device in {p.device for b in blocks for p in b.params}:  # sampler state, saved from the start
            self._collector.generator(device)
        for b in blocks:  # the whole state exists from the start (checkpoint tools load into it)
            self._states.complete(
                b,
                momentum=self.param_groups[b.group]["momentum"] != 0,
                eigenbasis=self.inverter.produces == "eigenbasis",
                inverses=not self.estimator.factors_are_inverses,
            )

    # ------------------------------------------------------------------ public introspection
    @property
    def blocks(self) -> list[Block]:
        """The blocks, in plan order."""
        return list(self._blocks)

    @property
    def needs_closure(self) -> bool:
        """Whether :meth:`step` needs a closure (the estimator re-evaluates after the update)."""
        return self._evidence.closure

    @property
    def evidence(self):
        """The :class:`~curvkit.EvidenceSpec` of the estimator."""
        return self._evidence

    @property
    def step_count(self) -> int:
        """Completed :meth:`step` calls (the step index :math:`t` of the next step)."""
        return self._run.step

    def block_plan(self) -> BlockPlan:
        """The block plan (``print(opt.block_plan())`` shows a table and the curvature coverage;
        its last column is the preconditioner's one-line description of each block)."""
        return BlockPlan(list(self._blocks), [self.preconditioner.describe(b) for b in self._blocks])

    def health(self) -> dict[str, dict[str, int]]:
        """Per-block counters of numerical fallbacks and misuse (see :mod:`curvkit.safeguards`).

        Reading them synchronises with the device (the counters of device-side faults live
        there) and emits the pending warnings.
        """
        totals = self._health.sync()
        return {b.name: totals[i] for i, b in enumerate(self._blocks)}

    def block_state(self, block: Block | int) -> dict[str, Any]:
        """The state dict of one block (statistics, inverses, momentum)."""
        self._collector.flush()
        if isinstance(block, int):
            block = self._blocks[block]
        return self._state_of(block)

    def statistics_due(self, group: int = 0) -> bool:
        """Whether statistics are due for param group ``group`` at the current step."""
        g = self.param_groups[group]
        t = self._run.step
        if t == 0 and self._run.warm_started:
            return False
        return t % g["curvature_every"] == 0

    def _inverse_due(self, group: dict[str, Any]) -> bool:
        t, t1, t2 = self._run.step, group["curvature_every"], group["invert_every"]
        return t % t2 == 0 or (t < t2 and t % t1 == 0)

    def close(self) -> None:
        """Remove the layer hooks this optimizer registered on the model (also done when the
        optimizer is garbage collected). The optimizer must not step afterwards."""
        self._collector.close()

    # ------------------------------------------------------------------ state
    def _state_of(self, block: Block) -> dict[str, Any]:
        return self._states(block)

    def _generator(self, device: torch.device) -> torch.Generator:
        return self._collector.generator(device)

    def _due_blocks(self) -> list[int]:
        due_groups = {gi for gi in range(len(self.param_groups)) if self.statistics_due(gi)}
        return [bi for bi, b in enumerate(self._blocks) if b.group in due_groups]

    def _repair_state(self, block_ids: Sequence[int], *, sync: bool = False) -> tuple[list[int], bool]:
        """Restart non-finite statistics and reset non-finite momentum of ``block_ids`` (see
        :meth:`curvkit.engine.inversion.Inversions.repair`)."""
        return self._inversions.repair(block_ids, sync=sync)

    # ------------------------------------------------------------------ evidence
    def update_curvature(
        self,
        outputs: Tensor | None = None,
        loss: LossSpec | None = None,
        *,
        grads: Sequence[Tensor | None] | None = None,
        reduction: str | None = None,
        **loss_options: Any,
    ) -> bool:
        r"""Collect curvature evidence for this step, if statistics are due.

        Call it after the forward pass and *before* ``loss.backward()``: it samples one target
        per example from the model's predictive distribution (``loss`` names the likelihood, see
        :mod:`curvkit.fisher`; extra keyword options such as ``class_dim`` go to it),
        differentiates the batch-mean sampled loss with :func:`torch.autograd.grad` through the
        same graph (retained for your backward), and hands the result to the estimator. On steps
        with no statistics due it returns ``False`` at once and retains nothing. For estimators
        that read the minibatch gradient it is a no-op (they collect in :meth:`step`).

        Gradient accumulation: call it once per micro-batch (after each micro-batch's forward);
        for estimators that read parameter gradients the evidence is the batch-size weighted mean
        over the micro-batches, and layer estimators that accumulate (KFAC) sum each
        micro-batch's statistics over its examples; either is folded once when :meth:`step`
        runs, as if the whole batch had been one.

        Low-level form: ``update_curvature(grads=[...])`` feeds one curvature gradient per
        parameter (in parameter order across groups; ``None`` to skip one) directly.

        Returns:
            ``True`` if evidence was collected.
        """
        if grads is not None:
            if outputs is not None or loss is not None:
                raise ValueError("pass either outputs and loss, or grads=, not both")
            params = [p for g in self.param_groups for p in g["params"]]
            grads = list(grads)
            if len(grads) != len(params):
                raise ValueError(f"grads must hold one tensor per parameter ({len(params)}), got {len(grads)}")
            for i, (g, p) in enumerate(zip(grads, params)):
                if g is not None and tuple(g.shape) != tuple(p.shape):
                    raise ValueError(f"grads[{i}] has shape {tuple(g.shape)}, its parameter {tuple(p.shape)}")
            due = self._due_blocks()
            if not due:
                return False
            self._collector.gradients(grads, params, due)
            return True
        if self._evidence.source is not Source.SAMPLED:
            return False
        loss = self.default_loss if loss is None else loss
        if outputs is None or loss is None:
            raise ValueError("update_curvature needs outputs and loss= (or grads=[...])")
        due = self._due_blocks()
        if not due:
            return False
        return self._collector.sampled(outputs, loss, due, reduction=reduction, **loss_options)

    def _phase(self, name: str):
        return self._collector.phase(name)

    @property
    def _recorder(self):
        return self._collector.recorder

    @torch.no_grad()
    def warm_start(
        self,
        batches: Iterable[Any],
        forward: Callable[[Any], Tensor],
        *,
        loss: LossSpec | None = None,
        reduction: str | None = None,
        max_batches: int | None = None,
        **loss_options: Any,
    ) -> int:
        r"""Set the statistics to their exact mean over ``batches`` at the current parameters.

        For sampled evidence ``forward(batch)`` returns the model outputs and ``loss`` names the
        likelihood; for minibatch evidence ``forward(batch)`` returns the (true-label) loss. The
        first training step then takes no new statistics (as in the paper). Extra keyword options
        (``class_dim``, ...) go to the likelihood, as in :meth:`update_curvature`.

        Returns:
            The number of batches used.
        """
        check_positive_int("max_batches", max_batches, allow_none=True)
        loss = self.default_loss if loss is None else loss
        return self._collector.warm_start(
            batches, forward, loss=loss, reduction=reduction, max_batches=max_batches, **loss_options
        )

    # ------------------------------------------------------------------ step
    def _check_stale(self) -> None:
        """Statistics due but no evidence this step: count, warn once (or raise when strict)."""
        run = self._run
        if self._evidence.source is not Source.SAMPLED or run.stats_taken_at == run.step:
            return
        due = self._due_blocks()
        if not due:
            return
        if run.stats_taken_at < 0 and not run.warm_started and not (self._distributor is not None and run.ever_had_stats):
            raise RuntimeError(
                f"estimator {self.estimator.name!r} has no curvature statistics at the first step: call "
                f"opt.update_curvature(outputs, loss=...) after the forward pass and before loss.backward() "
                f"(or opt.warm_start(...) before training)"
            )
        if self.strict and self._distributor is None:  # distributed: raised collectively in flush
            raise RuntimeError(
                f"statistics were due at step {run.step} but step() found no new curvature evidence: call "
                f"opt.update_curvature(outputs, loss=...) before loss.backward() on every step where "
                f"opt.statistics_due() (strict=True)"
            )
        run.stale_steps += 1
        for bi in due:
            self._health.count(bi, "missing_statistics")
        self._health.warn_once("missing_statistics", _stale_message(run.step))

    def _compute_inverses(self, block_ids: Sequence[int]) -> bool:
        """Repair and invert the factors of ``block_ids`` with the step's one host read (see
        :meth:`curvkit.engine.inversion.Inversions.refresh`); ``True`` when there was nothing
        to invert (the read then comes after the update)."""
        return self._inversions.refresh(block_ids, self.param_groups)

    @property
    def divide_inverses(self) -> bool:
        """Whether each factor's inversion is owned by one rank and shared (``distributed`` only)."""
        return self._inversions.divide

    @property
    def _owners(self) -> dict[tuple[int, int], int]:
        return self._inversions.owners

    def _active_blocks(self) -> list[int]:
        """The blocks with at least one gradient."""
        active = []
        for bi, b in enumerate(self._blocks):
            for p in b.params:
                if p.grad is not None:
                    active.append(bi)
                    break
        return active

    def _check_params(self, active: Sequence[int]) -> None:
        for bi in active:
            b = self._blocks[bi]
            for p, shape in zip(b.params, self._shapes[bi]):
                if tuple(p.shape) != shape:
                    raise ValueError(
                        f"parameter {b.name!r} changed shape from {shape} to {tuple(p.shape)} since the "
                        f"optimizer was built; rebuild the optimizer (or add_param_group) after resizing"
                    )
                g = p.grad
                if g is not None and g.is_sparse:
                    raise RuntimeError(
                        f"parameter {b.name!r} has a sparse gradient; curvkit needs dense gradients "
                        f"(use a dense embedding or a sparse-aware optimizer for it)"
                    )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Tensor | None:
        """Perform one optimisation step (see the module docstring for the order of work).

        Args:
            closure: re-evaluates the model. Two forms:

                * the :mod:`torch.optim` form: zero the gradients, forward, backward, return the
                  loss. Called first, unless the estimator needs it after the update (K-BFGS), in
                  which case it is called after the update on the same batch (and also first
                  when no fresh gradient is present, so a closure-only loop works). The gradients
                  of that after-update call are discarded.
                * the curvature form: forward only, returning ``(outputs, loss)``; the optimizer
                  zeroes the gradients, runs the sampled pass when statistics are due (with the
                  ``loss=`` likelihood given at construction) and ``loss.backward()``.
        """
        loss = self._run_closure_first(closure)
        t = self._run.step
        active = self._active_blocks()
        self._check_params(active)
        full = None if self._sharding is None else self._sharding.full_grads(self._blocks, active)  # FSDP2

        # 1. evidence: the minibatch gradient (when the estimator reads it), pending micro-batches
        if self._evidence.source is Source.MINIBATCH:
            self._collector.minibatch(active, full)
        self._collector.flush(self._due_blocks() if self._distributor is not None else None, strict=self.strict)
        self._check_stale()

        # 2. inverses where due (this is the step's only host synchronisation)
        due_inv = [bi for bi, b in enumerate(self._blocks) if self._inverse_due(self.param_groups[b.group])]
        read_after = self._compute_inverses(due_inv) if due_inv else False

        # 3. momentum, direction, update (batched, masked on the device)
        blocks = [self._blocks[bi] for bi in active]
        states = [self._state_of(b) for b in blocks]
        if self.estimator.factors_are_inverses:
            inverses = []
            for b, s in zip(blocks, states):
                factors = self.estimator.factors(b, s["estimator"], damping=self.param_groups[b.group]["damping"])
                inverses.append(None if factors is None else [None if f is None else f.matrix for f in factors])
        else:
            inverses = [s["inverses"] for s in states]
        self._update(
            blocks, active, states, inverses,
            group_of=lambda p: self.param_groups[self._group_of_param[id(p)]],
            schedule_group=[self.param_groups[b.group] for b in blocks],
            step=t, full_grads=full,
        )
        self._run.step += 1
        if read_after:  # nothing was inverted: the step's one read, after its update
            self._repair_state(due_inv, sync=True)

        # 4. a second evaluation at the new parameters, when the estimator needs it
        if self._evidence.closure:
            self._after_step(closure)
        self._collector.records_read()  # what the recorder holds now belongs to this step
        return loss

    def _run_closure_first(self, closure: Callable[[], Any] | None) -> Any:
        needs_after = self._evidence.closure
        if needs_after and closure is None:
            raise RuntimeError(
                f"estimator {self.estimator.name!r} needs a closure: opt.step(closure) where closure "
                f"re-evaluates the loss on the same batch (zero_grad, forward, backward, return loss)"
            )
        if closure is None or (needs_after and self._has_fresh_grads()):
            return None
        with torch.enable_grad():
            result = closure()
            if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Tensor):
                outputs, loss = result
                self.zero_grad()
                if self._evidence.source is Source.SAMPLED and self._due_blocks() and self._run.stats_taken_at != self._run.step:
                    if self.default_loss is None:
                        raise ValueError(
                            "step(closure) got (outputs, loss) from the closure, which asks for the sampled "
                            "pass: build the optimizer with loss='cross_entropy' (or another likelihood)"
                        )
                    self.update_curvature(outputs, self.default_loss)
                loss.backward()
                return loss
            return result

    def _after_step(self, closure: Callable[[], Any]) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        grads = [p.grad for p in params]
        for p in params:  # the closure's backward must not touch the step's gradients
            p.grad = None
        recorder = self._collector.recorder
        try:  # the closure's forwards belong to this step: the collector gathers nothing from them
            with torch.enable_grad(), (recorder.replacing(None) if recorder is not None else nullcontext()):
                self.estimator.after_step(
                    self._blocks, [self._state_of(b)["estimator"] for b in self._blocks],
                    closure=closure, recorder=recorder,
                )
        finally:
            for p, g in zip(params, grads):
                p.grad = g
        self._used_grads = {id(p): (weakref.ref(g), g._version) for p, g in zip(params, grads) if g is not None}

    def _has_fresh_grads(self) -> bool:
        """Whether some parameter holds a gradient that the last step did not already use (a new
        tensor, or one a backward pass accumulated into since)."""
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                used = self._used_grads.get(id(p))
                if used is None or used[0]() is not p.grad or used[1] != p.grad._version:
                    return True
        return False

    # ------------------------------------------------------------------ state_dict
    def state_dict(self) -> dict[str, Any]:
        """The state in torch's per-parameter layout (see :mod:`curvkit.engine.checkpoint`):
        tensors and plain Python values that ``torch.load(weights_only=True)`` reads. Pending
        micro-batch evidence is fed first and non-finite statistics are restarted (counted), so
        a checkpoint never holds them."""
        self._collector.flush()
        self._repair_state(list(range(len(self._blocks))))
        return checkpoint.save(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`, matching blocks by position and view shape.

        Raises ``ValueError`` if it was saved by a different method, with options that change
        the meaning of the state, or for a different layout; warns (or, with ``strict=True``,
        raises) when it holds non-finite statistics.
        """
        checkpoint.load(self, state_dict, strict=self.strict)

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_finalizer", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_collector" in state:  # maps keyed by id() refer to the copied parameters now
            self._group_of_param = {id(p): gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
            if self.model is not None:
                self._param_names = {id(p): n for n, p in self.model.named_parameters()}
            else:
                self._param_names = {id(b.params[0]): b.name for b in self._blocks if len(b.params) == 1}
            self._used_grads = {}
            self._collector.due_blocks = weakref.WeakMethod(self._due_blocks)
            self._finalizer = weakref.finalize(self, EvidenceCollector.close, self._collector)


def _check_compile_update(compile_update: Any, nonfinite: str, preconditioner: Preconditioner) -> None:
    if not isinstance(compile_update, bool):
        raise ValueError(f"compile_update must be a bool, got {compile_update!r}")
    if compile_update and nonfinite != "skip":
        raise ValueError(
            f"compile_update=True needs nonfinite='skip' (nonfinite={nonfinite!r} reads the finiteness flags "
            f"on the host in the middle of the update, which a single compiled graph cannot do)"
        )
    if compile_update and not preconditioner.traceable:
        raise ValueError(
            f"compile_update=True needs a preconditioner whose apply_group compiles into one graph "
            f"(Preconditioner.traceable); {preconditioner.name!r} does not declare it: leave compile_update=False"
        )


def _stale_message(step: int) -> str:
    return (
        f"statistics were due at step {step} but step() found no new curvature evidence: call "
        f"opt.update_curvature(outputs, loss=...) before loss.backward() on every step where "
        f"opt.statistics_due() (otherwise the curvature goes stale); strict=True raises instead"
    )
