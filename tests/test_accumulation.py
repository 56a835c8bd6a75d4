"""Gradient accumulation for layer estimators (KFAC): the statistics of several micro-batches
before one ``step()`` are those of the whole batch, for sampled and empirical evidence.

The reference cannot share the accumulation code: a second optimizer on a copy of the model that
sees the whole batch in one forward pass. Micro-batches have unequal sizes (3 + 5), so a plain
(unweighted) mean of per-micro-batch statistics, or the last micro-batch alone, fails.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import curvkit

D = torch.float64
SIZES = (3, 5)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(D)


def data(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + step)
    x = torch.randn(sum(SIZES), 6, generator=g, dtype=D)
    y = torch.randint(0, 4, (sum(SIZES),), generator=g)
    pseudo = torch.randn(sum(SIZES), 4, generator=g, dtype=D)  # fixed "sampled" targets
    return x, y, pseudo


def fixed_sampler(targets: torch.Tensor):
    """A sampler callable whose draws are fixed: the sampled loss of a batch is deterministic,
    so the whole-batch reference sees exactly the micro-batches' evidence."""
    return lambda outputs, generator: 0.5 * (outputs - targets).pow(2).sum(1).mean()


def kfac(model: nn.Module, evidence: str) -> curvkit.CurvatureOptimizer:
    return curvkit.compose(
        model, estimator="kfac", estimator_options={"evidence": evidence}, lr=0.05, damping=0.1,
        momentum=0.9, curvature_every=1, invert_every=2, seed=0,
    )


def statistics(opt: curvkit.CurvatureOptimizer) -> list[torch.Tensor]:
    out = []
    for b in opt.blocks:
        st = opt.block_state(b)["estimator"]
        for key in ("A", "G"):
            if st.get(key) is not None:
                out.append(st[key].clone())
    return out


def slices():
    start = 0
    for n in SIZES:
        yield slice(start, start + n)
        start += n


@pytest.mark.parametrize("evidence", ["sampled", "empirical"])
def test_kfac_micro_batches_equal_the_whole_batch(evidence: str) -> None:
    whole_model = make_model()
    micro_model = copy.deepcopy(whole_model)
    whole, micro = kfac(whole_model, evidence), kfac(micro_model, evidence)
    n = sum(SIZES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no partial-evidence or missing-evidence warning
        for step in range(4):
            x, y, pseudo = data(step)
            whole.zero_grad()
            out = whole_model(x)
            if evidence == "sampled":
                whole.update_curvature(out, fixed_sampler(pseudo))
            nn.functional.cross_entropy(out, y).backward()
            whole.step()

            micro.zero_grad()
            for sl in slices():  # the usual accumulation loop: each loss is its share of the batch mean
                out = micro_model(x[sl])
                if evidence == "sampled":
                    micro.update_curvature(out, fixed_sampler(pseudo[sl]))
                (nn.functional.cross_entropy(out, y[sl], reduction="sum") / n).backward()
            micro.step()

            for s_micro, s_whole in zip(statistics(micro), statistics(whole), strict=True):
                torch.testing.assert_close(s_micro, s_whole, rtol=1e-10, atol=1e-12)
            for p, q in zip(micro_model.parameters(), whole_model.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    assert all(v == 0 for h in micro.health().values() for v in h.values())


def test_kfac_statistics_are_not_the_last_micro_batch_or_the_plain_mean() -> None:
    """The equality above is not an accident of the data: the last micro-batch alone and the
    unweighted mean of the two micro-batches both differ from the whole batch."""
    model = make_model()
    x, y, pseudo = data(0)

    def stats_of(batches):
        opt = kfac(copy.deepcopy(model), "sampled")
        m = opt.model
        for sl in batches:
            opt.update_curvature(m(x[sl]), fixed_sampler(pseudo[sl]))
        return statistics(opt)

    whole = stats_of([slice(0, 8)])
    last = stats_of([slice(3, 8)])
    first = stats_of([slice(0, 3)])
    plain_mean = [(a + b) / 2 for a, b in zip(first, last)]
    for bad in (last, plain_mean):
        assert any(not torch.allclose(w, b, rtol=1e-3) for w, b in zip(whole, bad))


def test_kfac_second_call_on_one_forward_is_refused() -> None:
    model = make_model()
    opt = kfac(model, "sampled")
    x, _, pseudo = data(0)
    out = model(x)
    opt.update_curvature(out, fixed_sampler(pseudo))
    with pytest.raises(RuntimeError, match="once per forward"):
        opt.update_curvature(out, fixed_sampler(pseudo))


def test_empirical_kfac_takes_no_statistics_from_a_step_not_due() -> None:
    """With statistics every 2 steps, micro-batches of an off step do not leak into the next
    statistics step, and the records of a step are read once."""
    whole_model = make_model()
    micro_model = copy.deepcopy(whole_model)
    opts = [
        curvkit.compose(m, estimator="kfac", estimator_options={"evidence": "empirical"}, lr=0.05,
                        damping=0.1, curvature_every=2, invert_every=2, seed=0)
        for m in (whole_model, micro_model)
    ]
    n = sum(SIZES)
    for step in range(5):
        x, y, _ = data(step)
        opts[0].zero_grad()
        nn.functional.cross_entropy(whole_model(x), y).backward()
        opts[0].step()
        opts[1].zero_grad()
        for sl in slices():
            (nn.functional.cross_entropy(micro_model(x[sl]), y[sl], reduction="sum") / n).backward()
        opts[1].step()
        for a, b in zip(statistics(opts[1]), statistics(opts[0]), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("memory", [None, 4])
def test_kbfgs_micro_batches_equal_the_whole_batch(memory) -> None:
    """K-BFGS accumulates too: A and the step's mean input, pre-activation and output gradient
    over the micro-batches, and the closure's means over the same micro-batches at the new
    parameters, so the curvature pairs and the update are those of the whole batch."""
    curvkit_kbfgs = pytest.importorskip("curvkit_kbfgs")
    whole_model = make_model()
    micro_model = copy.deepcopy(whole_model)
    opts = [curvkit_kbfgs.KBFGS(m, lr=0.05, memory=memory) for m in (whole_model, micro_model)]
    n = sum(SIZES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(4):
            x, y, _ = data(step)

            def whole_closure():
                opts[0].zero_grad()
                loss = nn.functional.cross_entropy(whole_model(x), y)
                loss.backward()
                return loss

            def micro_closure():
                opts[1].zero_grad()
                total = 0.0
                for sl in slices():
                    loss = nn.functional.cross_entropy(micro_model(x[sl]), y[sl], reduction="sum") / n
                    loss.backward()
                    total = total + loss.detach()
                return total

            whole_closure()
            opts[0].step(whole_closure)
            micro_closure()
            opts[1].step(micro_closure)
            for bw, bm in zip(opts[0].blocks, opts[1].blocks):
                sw, sm = opts[0].block_state(bw)["estimator"], opts[1].block_state(bm)["estimator"]
                for key in ("A", "Ha", "Hg", "S", "Y", "s_avg", "y_avg"):
                    if isinstance(sw.get(key), torch.Tensor):
                        torch.testing.assert_close(sm[key], sw[key], rtol=1e-9, atol=1e-12)
            for p, q in zip(micro_model.parameters(), whole_model.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    assert all(v == 0 for h in opts[1].health().values() for v in h.values())


def test_kbfgs_closure_of_one_micro_batch_is_refused() -> None:
    """The closure must re-evaluate the whole accumulated batch: one micro-batch is refused
    with the fix in the message, never silently paired with the wrong rows."""
    curvkit_kbfgs = pytest.importorskip("curvkit_kbfgs")
    model = make_model()
    opt = curvkit_kbfgs.KBFGS(model, lr=0.05)
    x, y, _ = data(0)
    opt.zero_grad()
    for sl in slices():
        (nn.functional.cross_entropy(model(x[sl]), y[sl], reduction="sum") / sum(SIZES)).backward()

    def last_only():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[3:]), y[3:])
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="same batch"):
        opt.step(last_only)


def test_kbfgs_micro_batches_on_a_step_without_statistics_are_warned() -> None:
    """With statistics every other step, the after-step pairs of an off step read the last
    micro-batch's records only: counted and warned, never silent."""
    curvkit_kbfgs = pytest.importorskip("curvkit_kbfgs")
    model = make_model()
    opt = curvkit_kbfgs.KBFGS(model, lr=0.05, curvature_every=2)
    x, y, _ = data(0)
    n = sum(SIZES)

    def closure():
        opt.zero_grad()
        for sl in slices():
            (nn.functional.cross_entropy(model(x[sl]), y[sl], reduction="sum") / n).backward()

    closure()
    opt.step(closure)  # step 0: statistics due, accumulated, nothing to say
    assert sum(h["partial_evidence"] for h in opt.health().values()) == 0
    closure()
    with pytest.warns(curvkit.CurvkitWarning, match="last micro-batch"):
        opt.step(closure)  # step 1: no statistics due
    assert sum(h["partial_evidence"] for h in opt.health().values()) > 0
