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
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from .blocks import Block, BlockPlan
from .config import check_choice, check_in_unit_interval, check_nonnegative, check_positive, check_positive_int
from .estimators.tensor_normal import statistics_dtype
from .fisher import LossSpec, sampled_loss
from ._tree import map_tensors, tensors_in
from .hooks import LayerRecorder
from .inverters.identity import IdentityInverter
from .operators import EigenBasis
from .interfaces import BlockEvidence, CurvatureEstimator, Inverter, Preconditioner, Source
from .safeguards import CurvkitWarning, InversionRequest, invert_all, new_health

__all__ = ["CurvatureOptimizer", "GROUP_OPTIONS"]

#: Options that may differ per param group.
GROUP_OPTIONS = (
    "lr", "momentum", "dampening", "weight_decay", "damping", "curvature_every", "invert_every",
)
_STATE_FORMAT = 1


def _validate_group_options(options: dict[str, Any]) -> None:
    if "lr" in options:
        lr = options["lr"]
        if isinstance(lr, Tensor):
            if lr.numel() != 1 or not bool(lr >= 0):
                raise ValueError(f"lr must be a number >= 0, got {lr!r}")
        else:
            check_nonnegative("lr", lr)
    if "momentum" in options:
        check_in_unit_interval("momentum", options["momentum"])
    if "dampening" in options:
        check_in_unit_interval("dampening", options["dampening"])
    if "weight_decay" in options:
        check_nonnegative("weight_decay", options["weight_decay"])
    if "damping" in options:
        check_positive("damping", options["damping"])
    for name in ("curvature_every", "invert_every"):
        if name in options:
            check_positive_int(name, options[name])


class CurvatureOptimizer(torch.optim.Optimizer):
    r"""A :class:`torch.optim.Optimizer` composed of a curvature estimator, an inverter and a
    preconditioner.

    Usually built by :func:`curvkit.compose` or a preset such as :func:`curvkit.TNT`.

    Args:
        params: parameters, ``(name, parameter)`` pairs, or param-group dicts (which may override
            any of ``lr, momentum, dampening, weight_decay, damping, curvature_every,
            invert_every``).
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
        model: the model (needed by layer-based estimators; also names the blocks).
        nonfinite: ``"skip"`` (skip the update or statistics of a block whose gradient/evidence is
            not finite, and count it in :meth:`health`) or ``"raise"``
            (:class:`FloatingPointError`).
        seed: seed of the optimizer's own generator for target sampling (default: drawn from
            torch's global generator at construction, so ``torch.manual_seed`` controls it).
        sync_statistics: under :mod:`torch.distributed`, average the updated statistics over all
            ranks after every statistics update (one all-reduce per update), so every rank holds
            the statistics of the global batch and the replicas stay identical. Exact for
            estimators whose statistics are linear in the evidence (EMAs of Grams or covariances:
            TNT, Shampoo, KFAC); refused for the others.
    """

    def __init__(
        self,
        params: Iterable[Any],
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
    ) -> None:
        for name, part, kind in (
            ("estimator", estimator, CurvatureEstimator),
            ("preconditioner", preconditioner, Preconditioner),
            ("inverter", inverter, Inverter),
        ):
            if not isinstance(part, kind):
                raise ValueError(f"{name} must be a {kind.__name__}, got {type(part).__name__}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            damping=damping,
            curvature_every=curvature_every,
            invert_every=invert_every,
        )
        _validate_group_options(defaults)
        check_positive_int("max_factor_dim", max_factor_dim, allow_none=True)
        check_choice("nonfinite", nonfinite, ("skip", "raise"))
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self.estimator = estimator
        self.preconditioner = preconditioner
        self.inverter = inverter
        self.max_factor_dim = max_factor_dim
        self.model = model
        self.nonfinite = nonfinite
        if not isinstance(sync_statistics, bool):
            raise ValueError(f"sync_statistics must be a bool, got {sync_statistics!r}")
        if sync_statistics and not estimator.linear_statistics:
            raise ValueError(
                f"sync_statistics=True averages statistics across ranks, which is exact only for "
                f"estimators whose statistics are linear in the evidence; {estimator.name!r} is not"
            )
        self.sync_statistics = sync_statistics
        if estimator.factors_are_inverses and not isinstance(inverter, IdentityInverter):
            raise ValueError(
                f"estimator {estimator.name!r} maintains inverse factors directly, so inverting them "
                f"again would be wrong: compose it with inverter='identity' (got {inverter.name!r})"
            )
        self._evidence = estimator.evidence
        if self._evidence.layer_io and model is None:
            raise ValueError(
                f"estimator {estimator.name!r} needs layer inputs and output gradients: pass model=<your nn.Module>"
            )
        self._blocks: list[Block] = []
        self._param_names: dict[int, str] = {}
        if model is not None:
            self._param_names = {id(p): n for n, p in model.named_parameters()}
        params = self._normalise_params(params)
        super().__init__(params, defaults)
        self._seed = int(torch.randint(0, 2**62, (), generator=None).item()) if seed is None else seed
        self._generators: dict[str, torch.Generator] = {}
        self._step_count = 0
        self._stats_taken_at = -1
        self._ever_had_stats = False
        self._warm_started = False
        self._health: dict[int, dict[str, int]] = {}
        self._warned: set[str] = set()
        self._recorder: LayerRecorder | None = None
        self._used_grads: dict[int, tuple[weakref.ref, int]] = {}
        self._build_plan()

    # ------------------------------------------------------------------ construction helpers
    def _normalise_params(self, params: Iterable[Any]) -> list[dict[str, Any]]:
        if isinstance(params, Tensor):
            raise ValueError("params must be an iterable of tensors or dicts, got a single Tensor")
        items = list(params)
        if not items:
            raise ValueError("params is empty: the optimizer got no parameters to optimise")
        groups = items if isinstance(items[0], dict) else [{"params": items}]
        out = []
        seen: set[int] = set()
        for gi, group in enumerate(groups):
            if not isinstance(group, dict):
                raise ValueError("params mixes dicts (param groups) and tensors; use one form")
            group = dict(group)
            raw = group["params"]
            raw = [raw] if isinstance(raw, Tensor) else list(raw)
            plist = []
            for i, item in enumerate(raw):
                if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                    name, p = item
                    self._param_names.setdefault(id(p), name)
                else:
                    p = item
                if not isinstance(p, Tensor):
                    raise ValueError(f"params must be tensors, got {type(p).__name__} in group {gi}")
                if not p.is_leaf:
                    raise ValueError(f"parameter {i} of group {gi} is not a leaf tensor (can't optimise it)")
                if p.is_complex():
                    raise ValueError(
                        f"parameter {self._param_names.get(id(p), i)!r} is complex ({p.dtype}); curvkit "
                        f"supports real floating-point parameters only (view it as real with torch.view_as_real)"
                    )
                if not p.is_floating_point():
                    raise ValueError(f"parameter {i} of group {gi} has dtype {p.dtype}; only floating point is supported")
                if id(p) in seen:
                    raise ValueError(
                        f"parameter {self._param_names.get(id(p), i)!r} appears more than once in params; "
                        f"pass each parameter once"
                    )
                seen.add(id(p))
                plist.append(p)
            group["params"] = plist
            group.pop("param_names", None)
            _validate_group_options({k: v for k, v in group.items() if k in GROUP_OPTIONS})
            out.append(group)
        return out

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _validate_group_options({k: v for k, v in param_group.items() if k in GROUP_OPTIONS})
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
        start = len(self._blocks)
        self._blocks.extend(blocks)
        for bi in range(start, len(self._blocks)):
            self._health[bi] = new_health()
        self._block_of_param = {id(p): bi for bi, b in enumerate(self._blocks) for p in b.params}
        if self._evidence.layer_io:
            if self._recorder is not None:
                self._recorder.remove()
            modules = [b.module for b in self._blocks if b.module is not None]
            self._recorder = LayerRecorder(modules, root=self.model, keep_outputs=self._evidence.layer_outputs)

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
        return self._step_count

    def block_plan(self) -> BlockPlan:
        """The block plan (``print(opt.block_plan())`` shows a table)."""
        return BlockPlan(list(self._blocks))

    def health(self) -> dict[str, dict[str, int]]:
        """Per-block counters of numerical fallbacks (see :mod:`curvkit.safeguards`)."""
        return {b.name: dict(self._health[i]) for i, b in enumerate(self._blocks)}

    def block_state(self, block: Block | int) -> dict[str, Any]:
        """The state dict of one block (statistics, inverses, momentum)."""
        if isinstance(block, int):
            block = self._blocks[block]
        return self._state_of(block)

    def statistics_due(self, group: int = 0) -> bool:
        """Whether statistics are due for param group ``group`` at the current step."""
        g = self.param_groups[group]
        t = self._step_count
        if t == 0 and self._warm_started:
            return False
        return t % g["curvature_every"] == 0

    def _inverse_due(self, group: dict[str, Any]) -> bool:
        t, t1, t2 = self._step_count, group["curvature_every"], group["invert_every"]
        return t % t2 == 0 or (t < t2 and t % t1 == 0)

    # ------------------------------------------------------------------ state
    def _state_of(self, block: Block) -> dict[str, Any]:
        state = self.state[block.params[0]]
        if not state:
            state["estimator"] = self.estimator.init_state(block)
            state["preconditioner"] = self.preconditioner.init_state(block)
            state["inverses"] = None
            state["momentum"] = None
        return state

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._seed + len(self._generators))
            self._generators[key] = gen
        return gen

    # ------------------------------------------------------------------ evidence
    def _due_blocks(self) -> list[int]:
        due_groups = {gi for gi in range(len(self.param_groups)) if self.statistics_due(gi)}
        return [bi for bi, b in enumerate(self._blocks) if b.group in due_groups]

    def _feed(self, block_ids: Sequence[int], grads_by_param: dict[int, Tensor | None], *, decay: float | None = None, batch_size: int | None = None) -> None:
        blocks = [self._blocks[bi] for bi in block_ids]
        evid = [[grads_by_param.get(id(p)) for p in b.params] for b in blocks]
        flags = []
        for gl in evid:
            present = [g for g in gl if g is not None]
            flags.append(torch.stack([torch.isfinite(g).all() for g in present]).all() if present else None)
        real = [f for f in flags if f is not None]
        ok_list = torch.stack(real).tolist() if real else []
        it = iter(ok_list)
        for bi, b, gl, f in zip(block_ids, blocks, evid, flags):
            if f is None:
                continue
            if not next(it):
                if self.nonfinite == "raise":
                    raise FloatingPointError(f"non-finite curvature evidence for block {b.name!r} at step {self._step_count}")
                self._health[bi]["skipped_nonfinite_evidence"] += 1
                self._warn_once("evidence", "non-finite curvature evidence; statistics update skipped")
                continue
            self.estimator.update(
                b, self._state_of(b)["estimator"],
                BlockEvidence(gradients=gl, layer=self._recorder, batch_size=batch_size),
                decay=decay,
            )
            self._ever_had_stats = True
        if self.sync_statistics:
            self._all_reduce_statistics(block_ids)

    def _all_reduce_statistics(self, block_ids: Sequence[int]) -> None:
        """Average every floating-point statistic of ``block_ids`` over the ranks (one
        all-reduce per dtype and device)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "sync_statistics=True needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group) before the first statistics update"
            )
        tensors = [
            t for bi in block_ids for t in tensors_in(self._state_of(self._blocks[bi])["estimator"])
            if t.is_floating_point()
        ]
        buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for t in tensors:
            buckets.setdefault((t.dtype, t.device), []).append(t)
        world = dist.get_world_size()
        for group in buckets.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def update_curvature(
        self,
        outputs: Tensor | None = None,
        loss: LossSpec | None = None,
        *,
        grads: Sequence[Tensor | None] | None = None,
        reduction: str | None = None,
    ) -> bool:
        r"""Collect curvature evidence for this step, if statistics are due.

        Call it after the forward pass and *before* ``loss.backward()``: it samples one target
        per example from the model's predictive distribution (``loss`` names the likelihood, see
        :mod:`curvkit.fisher`), differentiates the batch-mean sampled loss with
        :func:`torch.autograd.grad` through the same graph (retained for your backward), and feeds
        the estimator. On steps with no statistics due it returns ``False`` at once and retains
        nothing. For estimators that read the minibatch gradient it is a no-op (they collect in
        :meth:`step`).

        Low-level form: ``update_curvature(grads=[...])`` feeds one curvature gradient per
        parameter (in parameter order across groups; ``None`` to skip one) directly.

        Returns:
            ``True`` if statistics were updated.
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
            self._feed(due, {id(p): g for p, g in zip(params, grads)})
            self._stats_taken_at = self._step_count
            return True
        if self._evidence.source is not Source.SAMPLED:
            return False
        if outputs is None or loss is None:
            raise ValueError("update_curvature needs outputs and loss= (or grads=[...])")
        due = self._due_blocks()
        if not due:
            return False
        if self._stats_taken_at == self._step_count:
            raise RuntimeError("update_curvature was already called for this step; call it once per step")
        if not isinstance(outputs, Tensor) or outputs.grad_fn is None:
            raise RuntimeError(
                "update_curvature needs the model outputs with their autograd graph: call it after the "
                "forward pass, outside torch.no_grad(), and before loss.backward()"
            )
        params = [p for bi in due for p in self._blocks[bi].params if p.requires_grad]
        if not params:
            return False
        value = sampled_loss(outputs, loss, reduction=reduction, generator=self._generator(outputs.device))
        try:
            with self.estimator.capture(), self._phase("sampled"):
                grads_out = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        except RuntimeError as exc:
            if "second time" in str(exc) or "freed" in str(exc):
                raise RuntimeError(
                    "update_curvature could not differentiate through the forward graph because it was "
                    "already freed: call opt.update_curvature(outputs, loss=...) before loss.backward()"
                ) from exc
            raise
        self._feed(due, {id(p): g for p, g in zip(params, grads_out)}, batch_size=outputs.shape[0])
        self._stats_taken_at = self._step_count
        return True

    def _phase(self, name: str):
        from contextlib import nullcontext

        return self._recorder.phase(name) if self._recorder is not None else nullcontext()

    @torch.no_grad()
    def warm_start(
        self,
        batches: Iterable[Any],
        forward: Callable[[Any], Tensor],
        *,
        loss: LossSpec | None = None,
        reduction: str | None = None,
        max_batches: int | None = None,
    ) -> int:
        r"""Set the statistics to their exact mean over ``batches`` at the current parameters.

        For sampled evidence ``forward(batch)`` returns the model outputs and ``loss`` names the
        likelihood; for minibatch evidence ``forward(batch)`` returns the (true-label) loss. The
        first training step then takes no new statistics (as in the paper).

        Returns:
            The number of batches used.
        """
        check_positive_int("max_batches", max_batches, allow_none=True)
        sampled = self._evidence.source is Source.SAMPLED
        if sampled and loss is None:
            raise ValueError("warm_start with sampled evidence needs loss= (for example 'cross_entropy')")
        all_ids = list(range(len(self._blocks)))
        params = [p for b in self._blocks for p in b.params if p.requires_grad]
        n = 0
        for batch in batches:
            if max_batches is not None and n >= max_batches:
                break
            with torch.enable_grad():
                out = forward(batch)
                value = sampled_loss(out, loss, reduction=reduction, generator=self._generator(out.device)) if sampled else out
                with self.estimator.capture(), self._phase("sampled" if sampled else "minibatch"):
                    grads = torch.autograd.grad(value, params, allow_unused=True)
            self._feed(all_ids, {id(p): g for p, g in zip(params, grads)}, decay=n / (n + 1))
            n += 1
        if n == 0:
            raise ValueError("warm_start got no batches")
        self._warm_started = self._step_count == 0
        return n

    # ------------------------------------------------------------------ step
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"curvkit: {message} (see opt.health())", CurvkitWarning, stacklevel=3)

    def _compute_inverses(self, block_ids: Sequence[int]) -> None:
        requests = []
        for bi in block_ids:
            b = self._blocks[bi]
            state = self._state_of(b)
            factors = self.estimator.factors(b, state["estimator"], damping=self.param_groups[b.group]["damping"])
            if factors is None:
                continue
            if self.estimator.factors_are_inverses:  # maintained directly: no inversion, no copy
                state["inverses"] = [None if f is None else f.matrix for f in factors]
                continue
            previous = state["inverses"]
            for mode, f in enumerate(factors):
                if f is not None:
                    prev = previous[mode] if previous is not None else None
                    requests.append(InversionRequest((bi, mode), f, b.order, prev))
            state["inverses"] = [None] * len(factors)
        if not requests:
            return
        results = invert_all(self.inverter, requests, self._health, self._warned)
        refreshed: set[int] = set()
        for (bi, mode), inv in results.items():
            state = self._state_of(self._blocks[bi])
            if isinstance(inv, tuple):  # an eigenbasis inverter: (vectors, values)
                if bi not in refreshed:
                    refreshed.add(bi)
                    state["inverse_version"] = state.get("inverse_version", 0) + 1
                inv = EigenBasis(inv[0], inv[1], state["inverse_version"])
            state["inverses"][mode] = inv

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Perform one optimisation step (see the module docstring for the order of work).

        Args:
            closure: re-evaluates the model and returns the loss. Called first (as in
                :mod:`torch.optim`) unless the estimator needs it after the update (K-BFGS), in
                which case it is called after the update on the same batch (and also first when
                no fresh gradient is present, so a closure-only loop works). The gradients of
                that after-update call are discarded: ``p.grad`` keeps the step's gradient, and
                the next step treats it as stale unless a backward pass changed it.
        """
        loss = None
        needs_after = self._evidence.closure
        if needs_after and closure is None:
            raise RuntimeError(
                f"estimator {self.estimator.name!r} needs a closure: opt.step(closure) where closure "
                f"re-evaluates the loss on the same batch (zero_grad, forward, backward, return loss)"
            )
        if closure is not None and (not needs_after or not self._has_fresh_grads()):
            with torch.enable_grad():
                loss = closure()
        t = self._step_count

        # 1. gradients: find blocks with a gradient and check finiteness (one host sync)
        active: list[int] = []
        flags = []
        for bi, b in enumerate(self._blocks):
            grads = [p.grad for p in b.params]
            present = [g for g in grads if g is not None]
            if not present:
                continue
            for g, p in zip(grads, b.params):
                if g is not None and g.is_sparse:
                    raise RuntimeError(
                        f"parameter {b.name!r} has a sparse gradient; curvkit needs dense gradients "
                        f"(use a dense embedding or a sparse-aware optimizer for it)"
                    )
            active.append(bi)
            flags.append(torch.stack([torch.isfinite(g).all() for g in present]).all())
        finite = torch.stack(flags).tolist() if flags else []
        good: list[int] = []
        for bi, ok in zip(active, finite):
            if ok:
                good.append(bi)
                continue
            if self.nonfinite == "raise":
                raise FloatingPointError(f"non-finite gradient in block {self._blocks[bi].name!r} at step {t}")
            self._health[bi]["skipped_nonfinite_grad"] += 1
            self._warn_once("grad", "non-finite gradient; the block's update was skipped")

        # 2. statistics from the minibatch gradient, when the estimator reads it
        if self._evidence.source is Source.MINIBATCH and self._stats_taken_at != t:
            due = set(self._due_blocks())
            ids = [bi for bi in good if bi in due]
            if ids:
                self._feed(ids, {id(p): p.grad for bi in ids for p in self._blocks[bi].params})
                self._stats_taken_at = t
        if self._stats_taken_at < 0 and not self._warm_started and self._evidence.source is Source.SAMPLED:
            raise RuntimeError(
                f"estimator {self.estimator.name!r} has no curvature statistics at the first step: call "
                f"opt.update_curvature(outputs, loss=...) after the forward pass and before loss.backward() "
                f"(or opt.warm_start(...) before training)"
            )

        # 3. inverses where due
        due_inv = [bi for bi, b in enumerate(self._blocks) if self._inverse_due(self.param_groups[b.group])]
        if due_inv:
            self._compute_inverses(due_inv)

        # 4. momentum, direction, update
        directions: list[tuple[int, list[Tensor]]] = []
        dflags = []
        for bi in good:
            b = self._blocks[bi]
            group = self.param_groups[b.group]
            state = self._state_of(b)
            work = statistics_dtype(b.params[0].dtype)
            g = b.to_view([torch.zeros_like(p) if p.grad is None else p.grad for p in b.params]).to(work)
            mu, keep = group["momentum"], 1.0 - group.get("dampening", 0.0)
            buf = state["momentum"]
            if mu == 0:
                buf = g if keep == 1.0 else keep * g
            elif buf is None:
                buf = state["momentum"] = g.clone() if keep == 1.0 else keep * g
            else:
                buf.mul_(mu).add_(g, alpha=keep)
            direction = self.preconditioner.apply(
                b, state["preconditioner"], buf, state["inverses"], gradient=g
            )
            directions.append((bi, b.from_view(direction)))
            dflags.append(torch.isfinite(direction).all())
        dfinite = torch.stack(dflags).tolist() if dflags else []
        for (bi, parts), ok in zip(directions, dfinite):
            b = self._blocks[bi]
            if not ok:
                if self.nonfinite == "raise":
                    raise FloatingPointError(f"non-finite direction in block {b.name!r} at step {t}")
                self._health[bi]["skipped_nonfinite_direction"] += 1
                self._warn_once("direction", "non-finite preconditioned direction; the block's update was skipped")
                continue
            group = self.param_groups[b.group]
            lr, wd = group["lr"], group["weight_decay"]
            for p, d in zip(b.params, parts):
                if p.grad is None:
                    continue
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(d.to(p.dtype), alpha=-lr)
        self._step_count += 1

        # 5. a second evaluation at the new parameters, when the estimator needs it
        if needs_after:
            params = [p for g in self.param_groups for p in g["params"]]
            grads = [p.grad for p in params]
            for p in params:  # the closure's backward must not touch the step's gradients
                p.grad = None
            try:
                with torch.enable_grad():
                    self.estimator.after_step(
                        self._blocks, [self._state_of(b)["estimator"] for b in self._blocks],
                        closure=closure, recorder=self._recorder,
                    )
            finally:
                for p, g in zip(params, grads):
                    p.grad = g
            self._used_grads = {id(p): (weakref.ref(g), g._version) for p, g in zip(params, grads) if g is not None}
        return loss

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
    def _method_signature(self) -> dict[str, Any]:
        return {
            "estimator": {"name": self.estimator.name, "config": self.estimator.config.to_dict()},
            "preconditioner": {"name": self.preconditioner.name, "config": self.preconditioner.config.to_dict()},
            "inverter": {"name": self.inverter.name, "config": self.inverter.config.to_dict()},
        }

    def state_dict(self) -> dict[str, Any]:
        """A state dict of tensors and plain Python values (``torch.load(weights_only=True)``
        reads it) holding everything the next step needs."""
        sd = super().state_dict()
        sd["state"] = {}
        sd["curvkit"] = {
            "format": _STATE_FORMAT,
            "method": self._method_signature(),
            "step": self._step_count,
            "stats_taken_at": self._stats_taken_at,
            "ever_had_stats": self._ever_had_stats,
            "warm_started": self._warm_started,
            "seed": self._seed,
            "generators": {k: g.get_state() for k, g in self._generators.items()},
            "blocks": [
                {"name": b.name, "shape": list(b.shape), "state": self._state_of(b), "health": dict(self._health[i])}
                for i, b in enumerate(self._blocks)
            ],
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; raises ``ValueError`` if it was saved by a
        different method or for a different parameter layout."""
        sd = dict(state_dict)
        extra = sd.pop("curvkit", None)
        if not isinstance(extra, dict) or extra.get("format") != _STATE_FORMAT:
            raise ValueError("not a curvkit optimizer state dict (missing or unknown 'curvkit' entry)")
        mine, saved = self._method_signature(), extra["method"]
        for part in ("estimator", "preconditioner", "inverter"):
            if saved[part]["name"] != mine[part]["name"]:
                raise ValueError(
                    f"state dict was saved with {part} {saved[part]['name']!r}, this optimizer uses "
                    f"{mine[part]['name']!r}: load it into an optimizer of the same method"
                )
        blocks = extra["blocks"]
        if len(blocks) != len(self._blocks) or any(
            s["name"] != b.name or tuple(s["shape"]) != b.shape for s, b in zip(blocks, self._blocks)
        ):
            have = [(b.name, b.shape) for b in self._blocks]
            got = [(s["name"], tuple(s["shape"])) for s in blocks]
            raise ValueError(f"state dict has a different block layout: saved {got}, optimizer has {have}")
        for saved_block, b in zip(blocks, self._blocks):
            self.estimator.check_state(b, saved_block["state"]["estimator"])
        sd["state"] = {}
        super().load_state_dict(sd)
        for i, (saved_block, b) in enumerate(zip(blocks, self._blocks)):
            device = b.params[0].device
            self.state[b.params[0]] = _copy_to(saved_block["state"], device)
            self._health[i] = dict(saved_block["health"])
        self._step_count = int(extra["step"])
        self._stats_taken_at = int(extra["stats_taken_at"])
        self._ever_had_stats = bool(extra["ever_had_stats"])
        self._warm_started = bool(extra["warm_started"])
        self._seed = int(extra["seed"])
        self._generators = {}
        for key, gstate in extra["generators"].items():
            gen = torch.Generator(device=key)
            gen.set_state(gstate.cpu() if isinstance(gstate, Tensor) else gstate)
            self._generators[key] = gen


def _copy_to(value: Any, device: torch.device) -> Any:
    """Deep copy of a state value, tensors cloned onto ``device`` with their dtype kept."""
    return map_tensors(lambda t: t.detach().to(device=device, copy=True), value)
