"""The optimizer's update path under torch.compile (``compile_update=True``).

* the tensor side of the update (:func:`curvkit.engine.update.update_step`: momentum, direction,
  finiteness masks and the foreach update) traces into one graph, no breaks, for TNT;
* TNT with the compiled update equals the eager optimizer over steps with and without inversions,
  a learning-rate schedule, weight decay and a non-finite gradient (masked and counted the same),
  without recompiling;
* ``torch.compile(opt.step)`` around the whole step runs and equals eager.

Compile time dominates these tests: the models are tiny, and only one test uses inductor.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import curvkit
from curvkit.engine import update as update_module


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _batches(steps: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(steps)]


def _train(model, opt, batches, *, step=None, nan_at=None, schedule=None):
    step = opt.step if step is None else step
    for t, (x, y) in enumerate(batches):
        if schedule is not None:
            for g in opt.param_groups:
                g["lr"] = schedule(t, g["lr"])
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        opt.update_curvature(out, loss="cross_entropy")
        loss.backward()
        if nan_at == t:
            model[0].weight.grad[1, 2] = float("nan")
        step()


def _capture_update_arguments(monkeypatch, opt, model, batches):
    """The arguments of the eager update_step calls of a short run."""
    seen = []
    original = update_module.update_step

    def spy(*args):
        seen.append(args)
        return original(*args)

    monkeypatch.setattr(update_module, "update_step", spy)
    _train(model, opt, batches)
    monkeypatch.setattr(update_module, "update_step", original)
    return seen


def test_tnt_update_step_traces_into_one_graph_without_breaks(monkeypatch):
    model = _model()
    opt = curvkit.TNT(
        [
            {"params": model[0].parameters(), "weight_decay": 0.1},
            {"params": [model[2].weight], "momentum": 0.0, "lr": torch.tensor(0.02)},
            {"params": [model[2].bias], "dampening": 0.5},
        ],
        model=model, lr=1e-2, invert_every=2, seed=1,
    )
    seen = _capture_update_arguments(monkeypatch, opt, model, _batches(3))
    assert len(seen) == 3
    args = seen[-1]  # after inversions: dense inverses on every factored mode
    torch._dynamo.reset()
    with torch.no_grad():  # as in opt.step
        explained = torch._dynamo.explain(update_module.update_step)(*copy.deepcopy(args))
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_compiled_update_equals_eager_with_schedule_inversions_and_a_nonfinite_gradient():
    """Inductor, as ``compile_update=True`` runs it: 7 steps, inversions at steps 0-2, 4, 6; the
    learning rate changes every step; a NaN gradient at step 3 is skipped and counted."""
    batches = _batches(7)
    schedule = lambda t, lr: 1e-2 * 0.8**t  # noqa: E731
    runs = {}
    torch._dynamo.reset()
    counters.clear()
    for compiled in (False, True):
        model = _model()
        opt = curvkit.TNT(model, lr=1e-2, weight_decay=0.1, invert_every=3, seed=1, compile_update=compiled)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", curvkit.CurvkitWarning)
            _train(model, opt, batches, nan_at=3, schedule=schedule)
            runs[compiled] = (model, opt, opt.health())
    assert counters["stats"]["unique_graphs"] == 1  # one compilation: no recompile for the schedule
    (eager, eager_opt, eager_health), (comp, comp_opt, comp_health) = runs[False], runs[True]
    assert comp_health == eager_health
    assert comp_health["0.weight"]["skipped_nonfinite_grad"] == 1
    for p, q in zip(comp.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for i in range(len(eager_opt.blocks)):
        torch.testing.assert_close(
            comp_opt.block_state(i)["momentum"], eager_opt.block_state(i)["momentum"], rtol=1e-5, atol=1e-6
        )
    assert not torch.equal(next(comp.parameters()), next(_model().parameters()))  # it trained


def test_compiled_update_with_param_groups_and_a_missing_gradient(monkeypatch):
    """The plan's structure: a group without momentum, a tensor learning rate, dampening, a
    parameter whose gradient is missing for one step (a new plan: one recompile)."""
    monkeypatch.setattr(update_module.UpdateRule, "backend", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    results = []
    for compiled in (False, True):
        model = _model()
        opt = curvkit.TNT(
            [
                {"params": model[0].parameters(), "weight_decay": 0.1, "momentum": 0.0},
                {"params": [model[2].weight], "lr": torch.tensor(0.02), "weight_decay": 0.01},
                {"params": [model[2].bias], "dampening": 0.5},
            ],
            model=model, lr=1e-2, invert_every=2, seed=1, compile_update=compiled,
        )
        for t, (x, y) in enumerate(_batches(5)):
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            opt.zero_grad()
            opt.update_curvature(out, loss="cross_entropy")
            loss.backward()
            if t == 2:
                model[2].bias.grad = None
            opt.param_groups[2]["lr"] = 0.01 + 0.001 * t
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    assert counters["stats"]["unique_graphs"] == 2
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compile_update", [False, True])
def test_torch_compile_around_opt_step_equals_eager(monkeypatch, compile_update):
    """``torch.compile(opt.step)``: the host reads of inversion steps (``Tensor.tolist`` in the
    statistics check and the inverter's fallbacks) break the graph (9 breaks over the first two
    steps with torch 2.13; no recompiles after them); the result equals eager."""
    monkeypatch.setattr(update_module.UpdateRule, "backend", "aot_eager")
    batches = _batches(6)
    torch._dynamo.reset()
    eager = _model()
    ref = curvkit.TNT(eager, lr=1e-2, weight_decay=0.1, invert_every=4, seed=1)
    _train(eager, ref, batches)
    model = _model()
    opt = curvkit.TNT(model, lr=1e-2, weight_decay=0.1, invert_every=4, seed=1, compile_update=compile_update)
    _train(model, opt, batches, step=torch.compile(opt.step, backend="aot_eager"))
    assert opt.step_count == 6
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_compile_update_options_are_checked():
    model = _model()
    with pytest.raises(ValueError, match="compile_update must be a bool"):
        curvkit.TNT(model, compile_update="yes")
    with pytest.raises(ValueError, match="nonfinite='skip'"):
        curvkit.TNT(model, compile_update=True, nonfinite="raise")
    with pytest.raises(ValueError, match="traceable"):
        curvkit.compose(model.parameters(), estimator="tensor_normal", preconditioner="adamw",
                        inverter="identity", compile_update=True)


def test_an_optimizer_with_a_compiled_update_copies_and_pickles(monkeypatch):
    monkeypatch.setattr(update_module.UpdateRule, "backend", "aot_eager")
    torch._dynamo.reset()
    model = _model()
    opt = curvkit.TNT(model, lr=1e-2, seed=1, compile_update=True)
    _train(model, opt, _batches(2))
    for twin_model, twin in (copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))):
        before = [p.detach().clone() for p in twin_model.parameters()]
        _train(twin_model, twin, _batches(1))
        assert twin.step_count == 3
        assert all(not torch.equal(p, q) for p, q in zip(twin_model.parameters(), before))
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # the original is untouched


def test_the_cached_plan_follows_a_gradient_that_goes_missing_inside_a_block():
    """KFAC's blocks hold a layer's weight and bias: a step where the bias has no gradient must
    leave it alone (the cached plan of the previous step would update it)."""
    if "KFAC" not in curvkit.available("method")["method"]:
        pytest.skip("KFAC is not installed")
    model = _model()
    opt = curvkit.get("method", "KFAC")(model.parameters(), model=model, lr=1e-2, seed=1)
    for t, (x, y) in enumerate(_batches(3)):
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        opt.update_curvature(out, loss="cross_entropy")
        loss.backward()
        if t == 2:
            model[2].bias.grad = None
            bias, weight = model[2].bias.detach().clone(), model[2].weight.detach().clone()
        opt.step()
    assert torch.equal(model[2].bias, bias)
    assert not torch.equal(model[2].weight, weight)


def test_the_compile_benchmark_measures_a_step():
    """``python -m benchmarks.steptime.compiled`` (smoke: the eager mode, tiny model, one step)."""
    from benchmarks.steptime.compiled import measure

    result = measure({"mode": "eager", "batch": 8, "threads": 1, "quick": True, "steps": 1})
    assert result["step_ms"] > 0 and result["update_ms"] > 0 and result["opt_step_ms"] >= result["update_ms"]


def test_momentum_of_a_float64_block_next_to_float32_blocks_uses_mu_in_float64():
    """The momentum of each block is computed in its own dtype: M = mu M + g with mu = 0.9 in
    float64 for a float64 parameter grouped with float32 ones (the rule before the split rounded
    mu to the first block's float32)."""
    first, second = nn.Linear(4, 3), nn.Linear(3, 2).double()
    opt = curvkit.TNT([first.weight, second.weight], lr=1e-3, momentum=0.9, seed=1)
    grads = []
    for _ in range(2):
        first.weight.grad = torch.randn(3, 4)
        second.weight.grad = torch.randn(2, 3, dtype=torch.float64)
        grads.append(second.weight.grad.clone())
        opt.update_curvature(grads=[first.weight.grad, second.weight.grad])
        opt.step()
    expected = 0.9 * grads[0] + grads[1]
    assert torch.equal(opt.block_state(1)["momentum"], expected)


def test_einsum_contractions_of_higher_order_blocks_trace_without_breaks():
    """Mode products of a 3-way block go through the cached opt_einsum plan, which torch.compile
    must take as a constant (curvkit marks it without importing torch._dynamo at import time)."""
    from curvkit.contractions import contraction_plan, mode_gram, mode_products

    def reference_marker(): ...

    torch.compiler.assume_constant_result(reference_marker)
    assert vars(reference_marker) == {"_dynamo_marked_constant": True}  # what contraction_plan carries
    assert contraction_plan._dynamo_marked_constant is True

    def direction(g, a, b, c):
        return mode_products(g, [a, None, c]) + mode_products(g, [None, b, None]), mode_gram(g, 1)

    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(4, 3, 5, generator=gen)] + [torch.randn(d, d, generator=gen) for d in (4, 3, 5)]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(direction)(*args)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    compiled = torch.compile(direction, backend="eager", fullgraph=True)
    for got, want in zip(compiled(*args), direction(*args)):
        torch.testing.assert_close(got, want)
