r"""Conformance check of :class:`~curvkit.CurvatureEstimator` parts, run inside an optimizer."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..interfaces import BlockEvidence, CurvatureEstimator, Factor, Inverter, Preconditioner, Source
from ..methods import build_part
from ..optimizer import CurvatureOptimizer
from ..operators import EigenBasis
from ._common import (
    DataFactory, ModelFactory, Problem, assert_finite, assert_symmetric_psd, fail, roundtrip, train_step,
    true_label_loss,
)
from .resume import check_exact_resume

__all__ = ["check_estimator"]

_DEFAULT_OPTIONS: dict[str, Any] = dict(
    lr=1e-2, momentum=0.9, damping=0.1, curvature_every=1, invert_every=3, seed=1234,
)


class _Scaled(nn.Module):
    """``scale * inner(x)``: with ``scale = 0`` every parameter gradient is exactly zero."""

    def __init__(self, inner: nn.Module, scale: float) -> None:
        super().__init__()
        self.inner = inner
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * self.inner(x)


def _check_factors(who: str, opt: CurvatureOptimizer, what: str, rtol: float, *, require: bool) -> None:
    est = opt.estimator
    for b in opt.blocks:
        state = opt.block_state(b)
        damping = opt.param_groups[b.group]["damping"]
        factors = est.factors(b, state["estimator"], damping=damping)
        if factors is None:
            if require and b.kind == "kronecker" and any(b.factored):
                fail(who, f"block {b.name!r} has no factors after {what}")
            continue
        # One factor per mode of the view; except that a layout which splits the view into tiles
        # with statistics of their own (curvkit_shampoo's TiledLayout) declares ``factor_sizes``:
        # one size per (tile, mode), tile-major, so entry j is for mode j % order. Layouts without
        # that attribute are held to exactly one factor per mode, of the mode's size.
        sizes = tuple(getattr(b.layout, "factor_sizes", b.shape))
        tiled = hasattr(b.layout, "factor_sizes")
        if len(factors) != len(sizes) or len(sizes) % b.order:
            fail(who, f"block {b.name!r} (view {b.shape}) got {len(factors)} factors, expected one per "
                      f"{'(tile, mode)' if tiled else 'mode'} ({len(sizes)}) ({what})")
        for j, (d, f) in enumerate(zip(sizes, factors)):
            factored = b.factored[j % b.order]
            mode = f"{j % b.order}" + (f" of tile {j // b.order}" if tiled else "")
            if f is None:
                continue
            if not factored:
                fail(who, f"block {b.name!r} mode {mode} is unfactored (size {d}) but got a factor ({what})")
            if not isinstance(f, Factor):
                fail(who, f"factors must be curvkit.Factor or None, got {type(f).__name__} ({what})")
            if tuple(f.matrix.shape) != (d, d):
                fail(who, f"block {b.name!r} mode {mode}: factor of shape {tuple(f.matrix.shape)} for a mode "
                          f"of size {d} ({what})")
            assert_symmetric_psd(who, f"factor of block {b.name!r} mode {mode} ({what})", f.matrix, rtol=rtol)
            damp = torch.as_tensor(f.damping)
            if not bool(torch.isfinite(damp).all()) or bool((damp < 0).any()):
                fail(who, f"block {b.name!r} mode {mode}: damping {f.damping!r} is not finite and >= 0 ({what})")
        for j, inv in enumerate(state["inverses"] or []):
            if isinstance(inv, EigenBasis):  # an eigenbasis inverter's entry: check both parts
                assert_finite(who, f"inverse {j} (eigenvectors) of block {b.name!r} ({what})", inv.vectors)
                assert_finite(who, f"inverse {j} (eigenvalues) of block {b.name!r} ({what})", inv.values)
            elif inv is not None:
                assert_finite(who, f"inverse {j} of block {b.name!r} ({what})", inv)


def _check_healthy(who: str, opt: CurvatureOptimizer, model: nn.Module, what: str) -> None:
    for name, p in model.named_parameters():
        assert_finite(who, f"parameter {name!r} ({what})", p)
    for block, counters in opt.health().items():
        bad = {k: v for k, v in counters.items() if v}
        if bad:
            fail(who, f"block {block!r} needed numerical fallbacks {bad} ({what})")


def _check_misuse(who: str, problem: Problem, make_opt, layer_io: bool, source: Source, closure: bool) -> None:
    if layer_io:
        try:
            make_opt(problem.model(), pass_model=False)
        except ValueError:
            pass
        else:
            fail(who, "declares layer_io evidence but an optimizer without model= was accepted "
                      "(expected ValueError)")
    model = problem.model()
    opt = make_opt(model)
    x, y = problem.batch(99, 4)
    out = model(x)
    loss = true_label_loss(out, y, problem.loss)
    opt.zero_grad()
    if source is Source.SAMPLED:
        try:
            opt.update_curvature(out)
        except ValueError:
            pass
        else:
            fail(who, "update_curvature(outputs) without loss= did not raise ValueError")
        loss.backward(retain_graph=True)
        try:
            opt.step(lambda: loss) if closure else opt.step()
        except RuntimeError:
            pass
        else:
            fail(who, "step() at the first step without update_curvature(...) did not raise RuntimeError "
                      "(sampled evidence was never collected)")
        opt.zero_grad()
        if not opt.update_curvature(out, loss=problem.loss):
            fail(who, "update_curvature returned False at step 0, when statistics are due")
        try:  # a second micro-batch in the same step accumulates (or, for estimators that read
            # layer records of one forward pass, raises RuntimeError saying so)
            again = opt.update_curvature(out, loss=problem.loss)
        except RuntimeError:
            pass
        else:
            if again is not True:
                fail(who, "a second update_curvature call in the same step neither accumulated "
                          "(returned True) nor raised RuntimeError")
    else:
        if opt.update_curvature(out, loss=problem.loss):
            fail(who, "update_curvature returned True for an estimator with minibatch evidence "
                      "(its statistics come from the gradient in step())")
    if closure:
        loss.backward()
        try:
            opt.step()
        except RuntimeError:
            pass
        else:
            fail(who, "declares closure evidence but step() without a closure did not raise RuntimeError")


def _check_state_validation(who: str, problem: Problem, make_opt, sd: dict) -> None:
    from ..engine.checkpoint import block_layout, block_states, set_block_state

    blocks = block_layout(sd)
    saved = block_states(sd)
    kron = [i for i, s in enumerate(saved) if s["estimator"]]
    pair = next(((i, j) for i in kron for j in kron
                 if i < j and tuple(blocks[i]["shape"]) != tuple(blocks[j]["shape"])), None)
    if pair is None:
        return
    i, j = pair
    bad = roundtrip(sd)
    states = block_states(bad)
    bi, bj = states[i], states[j]
    bi["estimator"], bj["estimator"] = bj["estimator"], bi["estimator"]
    set_block_state(bad, i, bi)
    set_block_state(bad, j, bj)
    try:
        make_opt(problem.model()).load_state_dict(bad)
    except ValueError:
        return
    fail(who, f"load_state_dict accepted estimator statistics of block {blocks[j]['name']!r} (view "
              f"{tuple(blocks[j]['shape'])}) for block {blocks[i]['name']!r} (view {tuple(blocks[i]['shape'])}); "
              f"implement check_state to raise ValueError")


def _check_decay(who: str, estimator: CurvatureEstimator, opt: CurvatureOptimizer, rtol: float) -> None:
    gen = torch.Generator().manual_seed(7)
    for b in opt.blocks:
        g1 = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in b.params]
        g2 = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in b.params]
        with torch.no_grad():
            a = estimator.init_state(b)
            estimator.update(b, a, BlockEvidence(gradients=list(g1)))
            estimator.update(b, a, BlockEvidence(gradients=list(g2)), decay=0.0)
            c = estimator.init_state(b)
            estimator.update(b, c, BlockEvidence(gradients=list(g2)), decay=0.0)
            estimator.update(b, c, BlockEvidence(gradients=list(g2)), decay=0.5)
        fa = estimator.factors(b, a, damping=0.1)
        fc = estimator.factors(b, c, damping=0.1)
        if (fa is None) != (fc is None):
            fail(who, f"block {b.name!r}: factors exist after one explicit-decay update sequence but not the other")
        for mode, (x, z) in enumerate(zip(fa or [], fc or [])):
            if (x is None) != (z is None):
                fail(who, f"block {b.name!r} mode {mode}: inconsistent factor presence under explicit decay")
            if x is None:
                continue
            err = float((x.matrix - z.matrix).abs().max())
            scale = max(float(z.matrix.abs().max()), 1e-300)
            if err > rtol * scale:
                fail(who, f"block {b.name!r} mode {mode}: update(decay=0) must forget earlier evidence and "
                          f"update(decay=n/(n+1)) average equal evidence to itself (relative error {err / scale:.3e})")


def check_estimator(
    estimator: CurvatureEstimator,
    *,
    make_model: ModelFactory | None = None,
    make_data: DataFactory | None = None,
    loss: str = "cross_entropy",
    preconditioner: str | Preconditioner = "kronecker_mode",
    inverter: str | Inverter = "damped_eigen",
    inverter_options: Mapping[str, Any] | None = None,
    optimizer_options: Mapping[str, Any] | None = None,
    steps: int = 4,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float64,
    psd_rtol: float = 1e-8,
    check_state_validation: bool = True,
    check_decay: bool | None = None,
    check_accumulation: bool = True,
) -> None:
    r"""Check an estimator end to end inside a :class:`~curvkit.CurvatureOptimizer`.

    The optimizer is built around the estimator (with ``model=`` when
    ``estimator.evidence.layer_io``), ``preconditioner`` and ``inverter``, and trained with the
    loop every curvkit method shares (``update_curvature(outputs, loss=...)`` before
    ``loss.backward()``, a closure when the estimator needs one). It verifies:

    1. after ``steps`` steps every parameter is finite, no numerical fallback was needed, and
       every factored ``"kronecker"`` block has factors: one per mode, ``None`` on unfactored
       modes, each a symmetric PSD ``d_i x d_i`` matrix with finite damping ``>= 0`` (a block
       whose layout declares ``factor_sizes``, a tiled view with statistics per tile, gets one
       factor per entry of it instead, tile-major);
    2. the same holds with *zero* evidence (the model output multiplied by 0, so every gradient is
       exactly zero) and with *rank-deficient* evidence (batches of one example);
    3. exact resume: ``state_dict`` -> ``torch.save`` -> ``torch.load(weights_only=True)`` ->
       fresh model and optimizer -> the next ``steps`` steps are bit-for-bit identical;
    4. ``load_state_dict`` rejects (``ValueError``) statistics swapped between blocks of different
       shapes (``check_state_validation``);
    5. clear errors on misuse: ``ValueError`` without ``model=`` for ``layer_io`` estimators;
       for sampled evidence, ``ValueError`` for ``update_curvature`` without ``loss=``,
       ``RuntimeError`` for a first ``step()`` without ``update_curvature``; a second
       ``update_curvature`` in one step accumulates (returns ``True``) or raises ``RuntimeError``; ``update_curvature`` returns ``False`` for minibatch
       evidence; ``RuntimeError`` for ``step()`` without a closure when one is needed;
    6. the explicit-decay contract of :meth:`~curvkit.CurvatureEstimator.update` (the warm
       start's exact mean): ``decay=0`` forgets earlier evidence, and averaging the same evidence
       with itself leaves the factors unchanged (``check_decay``; by default only for estimators
       that read gradients, not layer records);
    7. micro-batch accumulation, for estimators that accumulate (those that read gradients, and
       layer estimators with :attr:`~curvkit.CurvatureEstimator.accumulates`): the statistics of
       one step fed by two micro-batches of unequal size (each ``update_curvature`` on its own
       forward, each loss its share of the batch mean) equal those of one forward over the whole
       batch (with a deterministic likelihood, so that both see the same evidence).

    Args:
        estimator: the part to check.
        make_model: builds the model (default :func:`~curvkit.testing.default_model`).
        make_data: ``(generator, batch_size) -> (inputs, targets)`` matching the model.
        loss: the likelihood / true-label loss name.
        preconditioner, inverter: parts (or registered names) composed with the estimator.
        inverter_options: options of ``inverter`` when it is given by name.
        optimizer_options: :class:`~curvkit.CurvatureOptimizer` options overriding the check's
            defaults (``lr=1e-2, momentum=0.9, damping=0.1, curvature_every=1, invert_every=3``).
        steps: training steps before the checks (and after the resume).
        batch_size: examples per batch.
        dtype: dtype of the model (float64 keeps the PSD checks sharp).
        psd_rtol: relative tolerance of the symmetry and PSD checks.
        check_state_validation: run check 4.
        check_decay: run check 6 (default: when the estimator does not need layer records).
        check_accumulation: run check 7 (off for options that fix the gradient scale to another
            loss convention, such as KFAC's ``gradient_scale``).

    Raises:
        AssertionError: (:class:`~curvkit.testing.ConformanceError`) naming the failed property.
    """
    who = f"estimator {getattr(estimator, 'name', '') or type(estimator).__name__}"
    if not isinstance(estimator, CurvatureEstimator):
        fail(who, f"must be a curvkit.CurvatureEstimator, got {type(estimator).__name__}")
    problem = Problem(make_model, make_data, loss=loss, dtype=dtype)
    spec = estimator.evidence
    pre = build_part("preconditioner", preconditioner)
    inv = build_part("inverter", inverter, inverter_options)
    options = {**_DEFAULT_OPTIONS, **dict(optimizer_options or {})}

    def make_opt(model: nn.Module, *, pass_model: bool = True) -> CurvatureOptimizer:
        return CurvatureOptimizer(
            model.parameters(), estimator=estimator, preconditioner=pre, inverter=inv,
            model=model if (spec.layer_io and pass_model) else None, **options,
        )

    # 1. ordinary training
    model = problem.model()
    opt = make_opt(model)
    for t in range(steps):
        x, y = problem.batch(t, batch_size)
        value = train_step(model, opt, x, y, problem.loss)
        assert_finite(who, f"training loss at step {t}", value)
    _check_factors(who, opt, f"{steps} training steps", psd_rtol, require=True)
    _check_healthy(who, opt, model, f"{steps} training steps")

    # 2. zero and rank-deficient evidence
    for what, scale, size in (("zero evidence", 0.0, batch_size), ("rank-deficient evidence (batch of 1)", 1.0, 1)):
        wrapped = _Scaled(problem.model(), scale)
        o = make_opt(wrapped)
        for t in range(3):
            x, y = problem.batch(100 + t, size)
            train_step(wrapped, o, x, y, problem.loss)
        _check_factors(who, o, what, psd_rtol, require=True)
        _check_healthy(who, o, wrapped, what)

    # 3. exact resume, 4. state validation
    sd = check_exact_resume(who, problem, lambda m: make_opt(m), steps=steps, batch_size=batch_size)
    if check_state_validation:
        _check_state_validation(who, problem, make_opt, sd)

    # 5. misuse
    _check_misuse(who, problem, make_opt, spec.layer_io, spec.source, spec.closure)

    # 6. explicit decay
    if check_decay if check_decay is not None else not spec.layer_io:
        _check_decay(who, estimator, opt, rtol=1e-9 if dtype == torch.float64 else 1e-4)

    # 7. micro-batch accumulation
    if check_accumulation and not spec.closure and (estimator.accumulates or not spec.layer_io):
        _check_accumulation(who, problem, make_opt, spec.source, batch_size, rtol=1e-9 if dtype == torch.float64 else 1e-4)


def _check_accumulation(who: str, problem: Problem, make_opt, source: Source, batch_size: int, *, rtol: float) -> None:
    import copy

    n = max(batch_size, 3)
    x, y = problem.batch(7, n)
    parts = (slice(0, 1), slice(1, n))  # unequal sizes: 1 and n - 1
    whole_model = problem.model()
    micro_model = copy.deepcopy(whole_model)
    whole, micro = make_opt(whole_model), make_opt(micro_model)

    def before_inversion(opt: CurvatureOptimizer) -> list[dict[str, Any]]:
        """The estimator states as the step folded them, before an inversion may rotate what a
        coupled preconditioner keeps there (EKFAC's scalings follow their eigenbasis)."""
        taken: list[dict[str, Any]] = []
        original = opt._compute_inverses

        def snapshot(*args: Any, **kwargs: Any) -> Any:
            taken.extend(copy.deepcopy(opt._state_of(b)["estimator"]) for b in opt.blocks)
            return original(*args, **kwargs)

        opt._compute_inverses = snapshot  # type: ignore[method-assign]
        return taken

    seen = {id(whole): before_inversion(whole), id(micro): before_inversion(micro)}

    def fixed(targets: Tensor):  # a deterministic stand-in for the sampled likelihood
        return lambda outputs, generator: true_label_loss(outputs, targets, problem.loss)

    out = whole_model(x)
    if source is Source.SAMPLED:
        whole.update_curvature(out, fixed(y))
    true_label_loss(out, y, problem.loss).backward()
    whole.step()
    for sl in parts:
        out = micro_model(x[sl])
        if source is Source.SAMPLED:
            micro.update_curvature(out, fixed(y[sl]))
        (true_label_loss(out, y[sl], problem.loss) * (sl.stop - sl.start) / n).backward()
    micro.step()
    for opt in (whole, micro):
        del opt._compute_inverses
    states_w = seen[id(whole)] or [whole.block_state(b)["estimator"] for b in whole.blocks]
    states_m = seen[id(micro)] or [micro.block_state(b)["estimator"] for b in micro.blocks]
    for bw, sw, sm in zip(whole.blocks, states_w, states_m):
        for key, tw in sw.items():
            tm = sm.get(key)
            if isinstance(tw, Tensor) and tw.is_floating_point() and isinstance(tm, Tensor):
                if not torch.allclose(tm, tw, rtol=rtol, atol=rtol * float(tw.abs().max()) if tw.numel() else 0.0):
                    fail(who, f"block {bw.name!r} statistic {key!r} after two micro-batches (1 + {n - 1} examples) "
                              f"differs from the whole batch's (max abs difference {float((tm - tw).abs().max()):.3g}): "
                              f"micro-batch evidence must accumulate as the example-weighted mean")
