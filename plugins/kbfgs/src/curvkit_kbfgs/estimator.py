r"""The ``kbfgs`` estimator: K-BFGS and K-BFGS(L) (Goldfarb, Ren & Bahamou, NeurIPS 2020).

For a Linear layer :math:`h = W a` (bias as a homogeneous column of :math:`W`, a 1 appended to
:math:`a`), K-BFGS approximates the inverse of the layer's Hessian block by a Kronecker product
:math:`H_g \otimes H_a` and moves along :math:`P = H_g M H_a` (:math:`M` the momentum buffer).
Both factors are *inverses*, kept directly, so the estimator is composed with the core ``identity``
inverter and the core ``kronecker_mode`` preconditioner (mode 0 = ``out`` = :math:`H_g`, mode 1 =
``in + 1`` = :math:`H_a`).

**Activation side** :math:`H_a \approx (A + \sqrt\lambda I)^{-1}`. On every statistics step
(:meth:`update`, before the direction) :math:`A \leftarrow \beta A + (1 - \beta)\, \overline{a a^\top}`
(``stat_decay`` :math:`\beta`; the first update, or ``opt.warm_start``, sets :math:`A`). The
first time factors are requested :math:`H_a` is inverted exactly, once; after every step
(:meth:`after_step`) it is updated by BFGS with the Hessian-action pair

.. math:: s_a = H_a \bar a, \qquad y_a = (A + \sqrt\lambda I)\, s_a ,

with :math:`\bar a` the mean input of the step's batch at :math:`\theta_t`.

**Pre-activation side** :math:`H_g`, from :math:`H_g = I`. After the parameter update the
optimizer hands over the closure; the estimator reads the mean pre-activation :math:`\bar h` and
:math:`\bar g = \sum_{\text{rows}} \partial L / \partial h` recorded in the step's own backward at
:math:`\theta_t` (phase ``"minibatch"``: the true-label minibatch loss, as in the paper), calls the
closure once (forward and backward on the same batch at :math:`\theta_{t+1}`) and reads them again:

.. math::
    s \leftarrow \beta_p s + (1 - \beta_p)(\bar h^+ - \bar h), \qquad
    y \leftarrow \beta_p y + (1 - \beta_p)(\bar g^+ - \bar g)

(``pair_decay`` :math:`\beta_p`, from zero; BFGS is invariant to scaling both by one factor, so
the zero start is harmless). For a batch-mean loss :math:`\bar g` is the mean of the per-example
gradients, the authors' scale. The pair is double damped (:func:`~curvkit_kbfgs.bfgs.double_damping`,
:math:`\mu_1` = ``powell``, :math:`\mu_2 = \sqrt\lambda`), skipped unless
:func:`~curvkit_kbfgs.bfgs.accept_pair` holds, and folded into :math:`H_g` by the dense BFGS update
(``memory=None``: K-BFGS) or appended to the last ``memory`` pairs (K-BFGS(L)).

**K-BFGS(L) and the preconditioner.** The pairs live in a fixed-size memory (``memory`` rows of
:math:`s` and :math:`y` plus a ``valid`` mask; a pair enters at the end and pushes the oldest
out, under a device-side mask, :func:`~curvkit_kbfgs.bfgs.lbfgs_push`). :meth:`factors` hands
:math:`H_g` to the core ``kronecker_mode`` preconditioner as an
:class:`~curvkit_kbfgs.operator.LBFGSOperator`, applied to the ``(out, in + 1)`` buffer by the
compact representation in two matrix products (:math:`4 m\, d_{out} (d_{in} + 1)` flops), never
forming the :math:`d_{out} \times d_{out}` matrix; the damping's :math:`H y` uses the same operator.

:math:`\lambda` is the optimizer's (per-group) ``damping``; the estimator reads it when factors are
requested and keeps the last value for its after-step updates. Non-finite statistics heal
themselves: a non-finite :math:`A` or :math:`H_a` restarts both (:math:`A = 0`, set by the next
finite batch, and :math:`H_a = (0 + \sqrt\lambda I)^{-1}`, its exact damped inverse, which the BFGS
pairs then carry to the new :math:`A`), a non-finite :math:`H_g` (or pair memory) restarts from the
identity. Every skip and restart is a masked update decided on the device (``torch.where``), and
the counters in ``state["counts"]`` are 0-d device tensors, so a steady-state step reads nothing
on the host. They
are detected from the vectors :math:`H_a \bar a`, :math:`A s_a` and :math:`H_g y` the updates
compute anyway, without scanning the matrices.
**Gradient accumulation.** With several micro-batch forwards before one ``step()``, the sums
:math:`\sum a a^\top`, :math:`\sum a`, :math:`\sum h` and :math:`\sum \partial L/\partial h` of
every micro-batch are added (:meth:`KBFGSEstimator.batch_statistics`), and the closure must
re-run all of them; the means of its forwards are summed alike, so the pair is the whole
batch's. A closure that evaluates other rows is refused.

(The optimizer discards the closure's gradients at :math:`\theta_{t+1}`: ``p.grad`` keeps the
step's gradient.) The closure must evaluate the same batch deterministically (no dropout
sampling), or the pairs measure noise instead of curvature; the closure's forward also moves
batch-norm running statistics a second time per step. The estimator warns once
(:class:`curvkit.CurvkitWarning`) when the optimizer is built for a model that holds batch-norm or
dropout modules in training mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from curvkit import (
    Block, BlockEvidence, CurvatureEstimator, EvidenceSpec, Factor, LayerRecorder, PartConfig, Source, register,
    statistics_dtype,
)
from curvkit.safeguards import warn_user
from curvkit.config import check_choice, check_in_unit_interval, check_nonnegative, check_positive_int
from curvkit.contractions import gram
from curvkit.engine.finite import select, zero_unless_

from .bfgs import LM_FORMS, accept_pair, bfgs_inverse_update_where, double_damping, lbfgs_push, restart_
from .layers import FALLBACK_KIND, LayerMeans, layer_inputs, layer_means, plan_blocks
from .operator import LBFGSOperator

__all__ = ["KBFGSConfig", "KBFGSEstimator", "damped_inverse"]


@dataclass(frozen=True)
class KBFGSConfig(PartConfig):
    """Options of :class:`KBFGSEstimator`.

    Attributes:
        stat_decay: EMA decay :math:`\\beta` of the activation statistic ``A`` (0.9).
        pair_decay: EMA decay :math:`\\beta_p` of the pre-activation pairs ``(s, y)`` (0.9).
        powell: Powell's constant :math:`\\mu_1` of the double damping, in (0, 1) (0.2).
        lm: the Levenberg-Marquardt part, ``"interpolate"`` (the authors' code) or ``"add"``
            (:math:`\\tilde y = y + \\mu_2 \\tilde s`); see :mod:`curvkit_kbfgs.bfgs`.
        memory: ``None`` keeps :math:`H_g` as a dense BFGS matrix (K-BFGS); an integer keeps the
            last ``memory`` pairs as an L-BFGS operator (K-BFGS(L), 100 in the paper).
        skip_tol: a pair is skipped unless :math:`s^\\top y > \\mathrm{tol}\\, s^\\top s\\, \\lVert r \\rVert`
            (:func:`curvkit_kbfgs.bfgs.accept_pair`; 1e-4 as in the authors' code).
        unsupported: parameters outside Linear layers get ``"fallback"`` (plain momentum) or
            ``"error"`` (refused when the optimizer is built).
    """

    stat_decay: float = 0.9
    pair_decay: float = 0.9
    powell: float = 0.2
    lm: str = "interpolate"
    memory: int | None = None
    skip_tol: float = 1e-4
    unsupported: str = "fallback"

    def __post_init__(self) -> None:
        check_in_unit_interval("stat_decay", self.stat_decay)
        check_in_unit_interval("pair_decay", self.pair_decay)
        check_in_unit_interval("powell", self.powell)
        if self.powell == 0:
            raise ValueError("powell must satisfy 0 < powell < 1 (0.2 in the paper), got 0")
        check_choice("lm", self.lm, LM_FORMS)
        check_positive_int("memory", self.memory, allow_none=True)
        check_nonnegative("skip_tol", self.skip_tol)
        check_choice("unsupported", self.unsupported, ("fallback", "error"))


def damped_inverse(a: Tensor, shift: float) -> Tensor:
    r""":math:`(A + \text{shift}\, I)^{-1}` by a float64 Cholesky factorisation, symmetrised, in
    ``a``'s dtype (not finite when ``a`` is not)."""
    eye = torch.eye(a.shape[0], dtype=torch.float64, device=a.device)
    chol, _ = torch.linalg.cholesky_ex(a.to(torch.float64) + shift * eye)
    inv = torch.cholesky_inverse(chol)
    return (0.5 * (inv + inv.T)).to(a.dtype)


def stochastic_modules(model: nn.Module) -> list[str]:
    """Names (``name (type)``) of the batch-norm and dropout modules of ``model`` in training
    mode (dropout with ``p > 0``), which a second forward pass per step disturbs."""
    out = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            out.append(f"{name or 'model'!r} ({type(module).__name__})")
        elif isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            out.append(f"{name or 'model'!r} ({type(module).__name__})")
    return out


def _all_finite(*tensors: Tensor) -> Tensor:
    """Whether every entry of the (small) ``tensors`` is finite, as a 0-d bool tensor, from their
    sums: a NaN or an infinity always shows in a sum; a sum that overflows from finite entries
    (beyond ~3e38 in float32) also counts as a fault, as the norms of the engine's checks do."""
    total = tensors[0].sum()
    for t in tensors[1:]:
        total = total + t.sum()
    return torch.isfinite(total)


@register("estimator", "kbfgs")
class KBFGSEstimator(CurvatureEstimator):
    """Kronecker-factored BFGS inverses :math:`H_g` (pre-activations) and :math:`H_a` (inputs) of
    Linear layers; compose it with ``inverter="identity"`` and ``preconditioner="kronecker_mode"``."""

    Config = KBFGSConfig
    #: BFGS updates are not linear in the evidence, so averaging them over ranks is not exact.
    linear_statistics = False
    #: H_g and H_a are already the inverse factors (compose with the identity inverter).
    factors_are_inverses = True
    #: Non-finite statistics are detected from the update vectors and restarted here.
    heals_statistics = True

    @property
    def evidence(self) -> EvidenceSpec:
        return EvidenceSpec(source=Source.MINIBATCH, layer_io=True, closure=True, layer_outputs=True)

    def plan(
        self,
        named_params: Sequence[tuple[str, nn.Parameter, int]],
        *,
        model: nn.Module | None,
        max_factor_dim: int | None,
    ) -> list[Block]:
        """One ``(out, in [+ 1])`` block per Linear layer, weight and bias together across param
        groups (see :mod:`curvkit_kbfgs.layers` and :mod:`curvkit_kfac.planning`).

        Warns (:class:`curvkit.CurvkitWarning`, once per estimator) when the model holds
        batch-norm or dropout modules in training mode: the closure's second forward pass moves
        batch-norm running statistics a second time per step and draws another dropout mask.
        """
        if model is not None and not getattr(self, "_warned_stochastic", False):
            noisy = stochastic_modules(model)
            if noisy:
                self._warned_stochastic = True
                warn_user(
                    f"curvkit: K-BFGS re-evaluates the closure after every step, and the model holds "
                    f"{', '.join(noisy[:4])}{' ...' if len(noisy) > 4 else ''} in training mode: batch-norm "
                    f"running statistics move twice per step and dropout draws a second mask, so the "
                    f"curvature pairs measure that noise too. Use model.eval() for those modules, or "
                    f"momentum=None on batch norms / p=0 dropout, if that matters"
                )
        return plan_blocks(named_params, model=model, max_factor_dim=max_factor_dim,
                           unsupported=self.config.unsupported)

    # ------------------------------------------------------------------ state
    def init_state(self, block: Block) -> dict[str, Any]:
        if block.kind == FALLBACK_KIND:
            return {}
        ref = block.params[0]
        dtype, device = statistics_dtype(ref.dtype), ref.device
        (d_out, d_in), (f_out, f_in) = block.shape, block.factored
        dense = self.config.memory is None
        zeros = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        return {
            "A": zeros(d_in, d_in) if f_in else None,
            "Ha": None,
            "updates": 0,
            "fresh": torch.zeros((), dtype=torch.bool, device=device),
            "Hg": torch.eye(d_out, dtype=dtype, device=device) if f_out and dense else None,
            "S": zeros(self.config.memory, d_out) if f_out and not dense else None,
            "Y": zeros(self.config.memory, d_out) if f_out and not dense else None,
            "valid": torch.zeros(self.config.memory, dtype=torch.bool, device=device) if f_out and not dense else None,
            "s_avg": zeros(d_out) if f_out else None,
            "y_avg": zeros(d_out) if f_out else None,
            "damping": None,
            # device counters (0-d int64 tensors): no host read to count a skip or a reset
            "counts": {k: torch.zeros((), dtype=torch.int64, device=device)
                       for k in ("a_pairs", "a_skipped", "g_pairs", "g_skipped", "resets")},
        }

    def check_state(self, block: Block, state: dict[str, Any]) -> None:
        expected = self.init_state(block)
        if set(state) != set(expected):
            raise ValueError(
                f"block {block.name!r}: saved K-BFGS state has entries {sorted(state)}, expected "
                f"{sorted(expected)} (saved for another block plan?)"
            )
        if not expected:
            return
        d_out, d_in = block.shape
        shapes = {"A": (d_in, d_in), "Ha": (d_in, d_in), "Hg": (d_out, d_out), "s_avg": (d_out,), "y_avg": (d_out,)}
        for key, shape in shapes.items():
            got, allowed = state[key], expected["A" if key == "Ha" else key] is not None
            if got is None and allowed and key != "Ha":
                raise ValueError(f"block {block.name!r}: saved state lacks {key} (saved with another memory setting?)")
            if got is not None and (not allowed or tuple(got.shape) != shape):
                raise ValueError(f"block {block.name!r}: saved {key} of shape {tuple(got.shape)} does not fit this "
                                 f"block (expected {shape if allowed else 'none'}; this estimator has "
                                 f"memory={self.config.memory})")
        for key in ("S", "Y", "valid"):
            got, want = state[key], expected[key]
            if (got is None) != (want is None) or (got is not None and tuple(got.shape) != tuple(want.shape)):
                raise ValueError(f"block {block.name!r}: saved L-BFGS pairs {key} do not fit this block "
                                 f"(memory={self.config.memory}, out={d_out})")

    # ------------------------------------------------------------------ statistics
    def update(
        self, block: Block, state: dict[str, Any], evidence: BlockEvidence, *, decay: float | None = None
    ) -> bool | None:
        r"""Fold the step's mean :math:`\overline{a a^\top}` into ``A`` (no host sync): it is
        :meth:`batch_statistics` followed by :meth:`fold`.

        Returns ``False`` when the block's layer recorded no input in this statistics step (its
        forward never ran with gradients enabled, was bypassed, or hooks did not fire), so the
        optimizer can count the block's missing evidence; ``None`` otherwise.
        """
        stats = self.batch_statistics(block, state, evidence)
        if stats is None or stats is False:
            return stats
        self.fold(block, state, stats, decay=decay)
        return None

    def batch_statistics(self, block: Block, state: dict[str, Any], evidence: BlockEvidence) -> dict[str, Any] | bool | None:
        r"""Sums over the rows of one forward/backward: ``aa`` :math:`= \sum a a^\top`, ``a``
        :math:`= \sum a`, ``h`` :math:`= \sum h`, ``g`` :math:`= \sum \partial L / \partial h`
        and ``rows``. Several micro-batches of one step add up to the whole batch's sums (with
        each micro-batch's loss its share of the batch mean, :math:`\bar g` is then the whole
        batch's, as :meth:`after_step` needs)."""
        if block.kind == FALLBACK_KIND or state["A"] is None:
            return None
        dtype = state["A"].dtype
        a = layer_inputs(evidence.layer, block, dtype)
        if a is None:
            return False
        out: dict[str, Any] = {"aa": gram(a), "a": a.sum(dim=0), "rows": a.shape[0]}
        means = layer_means(evidence.layer, block, dtype, inputs=False)
        if means is not None and means.rows == a.shape[0]:
            out.update(h=means.h * means.rows, g=means.g)
        return out

    def fold(self, block: Block, state: dict[str, Any], statistics: dict[str, Any], *, decay: float | None = None) -> None:
        r"""``A`` from the summed ``aa`` (masked EMA, a restart's next finite batch sets it), and
        the step's mean input and pre-activation kept for :meth:`after_step`."""
        rows = statistics["rows"]
        batch = statistics["aa"] / rows
        if decay is None:
            decay = 0.0 if state["updates"] == 0 else self.config.stat_decay
        old = state["A"]
        if decay == 0.0:
            new = batch
        else:  # after a restart (``fresh``) the next finite batch sets A: keep * old + (1 - keep) * batch
            keep = (~state["fresh"]).to(old.dtype) * decay
            new = torch.lerp(batch, old, keep)
        # a non-finite entry of a (or an overflow) always shows on the diagonal of a^T a
        finite = torch.isfinite(batch.diagonal()).all()
        state["A"] = select(finite, new, old)
        state["fresh"] = state["fresh"] & ~finite
        state["updates"] += 1
        if "h" in statistics:  # the step's means at theta_t, for this step's after_step only
            self.__dict__.setdefault("_before", {})[id(state)] = (
                state, LayerMeans(statistics["a"] / rows, statistics["h"] / rows, statistics["g"], rows)
            )

    def factors(self, block: Block, state: dict[str, Any], *, damping: float) -> list[Factor | None] | None:
        """``[H_g, H_a]`` as already-damped inverses (``Factor.damping = 0``); the first call
        after statistics exist inverts :math:`A + \\sqrt\\lambda I` (once)."""
        if block.kind == FALLBACK_KIND:
            return None
        state["damping"] = float(damping)
        f_out, f_in = block.factored
        if f_in and state["Ha"] is None:
            if state["updates"] == 0:
                return None
            state["Ha"] = damped_inverse(state["A"], math.sqrt(damping))
        h_g = None
        if f_out:
            h_g = state["Hg"] if self.config.memory is None else self._operator(state)
        return [
            Factor(h_g, 0.0) if h_g is not None else None,
            Factor(state["Ha"], 0.0) if f_in else None,
        ]

    # ------------------------------------------------------------------ after the step
    def after_step(
        self,
        blocks: Sequence[Block],
        states: Sequence[dict[str, Any]],
        *,
        closure: Callable[[], Tensor],
        recorder: LayerRecorder | None,
    ) -> None:
        """Update :math:`H_a` and :math:`H_g` from the step's batch at :math:`\\theta_t` and
        :math:`\\theta_{t+1}` (one closure call; none when no Linear layer recorded anything)."""
        work: list[tuple[Block, dict[str, Any], LayerMeans]] = []
        folded = self.__dict__.pop("_before", {})
        # several micro-batch forwards in this step: the closure's forwards are summed alike
        several = recorder is not None and getattr(recorder, "forwards", 1) > 1
        accumulated = False
        for b, st in zip(blocks, states):
            if b.kind == FALLBACK_KIND or st.get("damping") is None:
                continue
            kept = folded.get(id(st))
            if kept is not None and kept[0] is st:  # the means the statistics already summed
                before, accumulated = kept[1], several
            else:
                before = layer_means(recorder, b, statistics_dtype(b.params[0].dtype), inputs=st["Ha"] is not None)
            if before is not None:
                work.append((b, st, before))
        if not work:
            return
        if recorder is None or not accumulated:
            closure()
            self._fold_pairs(work, recorder)
            return
        # the closure may run several micro-batch forwards too: sum their means like the step's
        sums: dict[int, list[Any]] = {}
        seen = [recorder.forward_id]  # the records held now are the step's own (at theta_t)

        def collect() -> None:
            if recorder.forward_id == seen[0]:
                return
            seen[0] = recorder.forward_id
            for i, (b, st, before) in enumerate(work):
                m = layer_means(recorder, b, before.h.dtype, inputs=False)
                if m is None:
                    continue
                acc = sums.setdefault(i, [torch.zeros_like(before.h), torch.zeros_like(before.g), 0])
                acc[0] += m.h * m.rows
                acc[1] += m.g
                acc[2] += m.rows

        self._collect = collect  # held by the instance while the closure runs (weakly by the recorder)
        try:
            with recorder.replacing(self._collect_after):
                closure()
            collect()
        finally:
            del self._collect
        after = {i: LayerMeans(None, h / n, g, n) for i, (h, g, n) in sums.items()}
        self._fold_pairs(work, recorder, after=after)

    def _collect_after(self) -> None:
        collect = self.__dict__.get("_collect")
        if collect is not None:
            collect()

    def _fold_pairs(
        self,
        work: list[tuple[Block, dict[str, Any], LayerMeans]],
        recorder: LayerRecorder | None,
        *,
        after: dict[int, LayerMeans] | None = None,
    ) -> None:
        """Fold the step's pairs with masked updates: every decision (skip, reset) is a device
        tensor, so the steady-state step reads nothing on the host."""
        cfg = self.config
        for i, (b, st, before) in enumerate(work):
            mu = math.sqrt(st["damping"])
            counts = st["counts"]
            if st["Ha"] is not None:
                s_a = st["Ha"] @ before.a
                y_a = torch.addmv(s_a, st["A"], s_a, beta=mu)  # A s + mu s
                ok = accept_pair(s_a, y_a, before.a, tol=cfg.skip_tol)
                # a non-finite entry of H_a (of A) makes s_a (y_a) non-finite: no d x d scans
                reset = _all_finite(before.a) & ~_all_finite(s_a, y_a)
                ha = bfgs_inverse_update_where(st["Ha"], s_a, y_a, ok)
                # restart: A from the next batch, H_a = (0 + sqrt(lambda) I)^-1, the exact damped
                # inverse of the restarted A (BFGS pairs then track the new A)
                st["Ha"] = restart_(ha, reset, 1.0 / mu)  # ha is this step's fresh result
                zero_unless_(~reset, st["A"])
                st["fresh"] = st["fresh"] | reset
                counts["resets"] = counts["resets"] + reset
                counts["a_pairs"] = counts["a_pairs"] + ok
                counts["a_skipped"] = counts["a_skipped"] + ~ok
            if st["s_avg"] is None:
                continue
            new = after.get(i) if after is not None else layer_means(recorder, b, before.h.dtype, inputs=False)
            if new is None:
                continue
            if new.rows != before.rows:
                raise ValueError(
                    f"K-BFGS: layer {b.name!r} saw {before.rows} rows in the step's forward pass(es) and "
                    f"{new.rows} in the closure's: the closure must re-evaluate the same batch (all of "
                    f"its micro-batches, when gradients are accumulated over several)"
                )
            self._average_pair(st, new.h - before.h, new.g - before.g)
            if cfg.memory is None:
                hy = st["Hg"] @ st["y_avg"]
            else:
                hy = self._operator(st).matmul(st["y_avg"])
            s_t, y_t = double_damping(st["s_avg"], st["y_avg"], hy, mu1=cfg.powell, mu2=mu, form=cfg.lm)
            # y_avg is finite here, so a non-finite H y means a non-finite H_g (or pair memory)
            memory_ok = _all_finite(hy)
            ok = accept_pair(s_t, y_t, before.g, tol=cfg.skip_tol) & memory_ok
            self._fold_g(st, s_t, y_t, ok, ~memory_ok)
            counts["resets"] = counts["resets"] + ~memory_ok
            counts["g_pairs"] = counts["g_pairs"] + ok
            counts["g_skipped"] = counts["g_skipped"] + ~ok

    def _operator(self, st: dict[str, Any]) -> LBFGSOperator:
        """The :class:`LBFGSOperator` of a block's pair memory, built once per change of the
        memory (a step asks for it up to three times: the inversion, the direction and the
        pair's :math:`H y`). Cached on the estimator by the identity and version of the memory
        tensors (the pair push replaces them), so nothing extra is saved with the state."""
        tensors = (st["S"], st["Y"], st["valid"])
        key = tuple((id(t), t._version) for t in tensors)
        cache = self.__dict__.setdefault("_operators", {})
        hit = cache.get(id(st))
        if hit is not None and hit[0] == key and all(a is b for a, b in zip(hit[1], tensors)):
            return hit[2]
        op = LBFGSOperator(*tensors, rows_zeroed=True)  # lbfgs_push and restarts keep free rows at zero
        cache[id(st)] = (key, tensors, op)
        return op

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for transient in ("_operators", "_before", "_collect"):  # keyed by this process's ids / per step
            state.pop(transient, None)
        return state

    def _average_pair(self, st: dict[str, Any], s: Tensor, y: Tensor) -> None:
        beta = self.config.pair_decay
        s_avg, y_avg = st["s_avg"], st["y_avg"]
        avg_finite = _all_finite(s_avg, y_avg)
        s_avg = torch.where(avg_finite, s_avg, 0.0)
        y_avg = torch.where(avg_finite, y_avg, 0.0)
        new_finite = _all_finite(s, y)
        # beta * avg + (1 - beta) * new
        st["s_avg"] = torch.where(new_finite, torch.lerp(s, s_avg, beta), s_avg)
        st["y_avg"] = torch.where(new_finite, torch.lerp(y, y_avg, beta), y_avg)

    def _fold_g(self, st: dict[str, Any], s: Tensor, y: Tensor, accept: Tensor, reset: Tensor) -> None:
        """Fold an accepted pair into H_g (dense BFGS or the pair memory); ``reset`` restarts H_g
        from the identity (an empty memory). Both are 0-d bool tensors."""
        if self.config.memory is None:
            st["Hg"] = restart_(bfgs_inverse_update_where(st["Hg"], s, y, accept), reset, 1.0)
            return
        S, Y, valid = lbfgs_push(st["S"], st["Y"], st["valid"], s, y, accept)
        keep = ~reset  # S, Y: fresh from lbfgs_push
        st["S"] = zero_unless_(keep, S)
        st["Y"] = zero_unless_(keep, Y)
        st["valid"] = valid & ~reset
