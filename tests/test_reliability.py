"""Numerical faults for every shipped method: parameters and state never take NaN/Inf.

Each case injects a fault and checks the policy: the parameters stay finite (and, for a skipped
step, unchanged), the stored statistics stay finite, and the health counters record what
happened. The count of cases per method is printed with ``-s``.
"""

import io
import warnings

import pytest
import torch
from torch import nn

import curvkit
from curvkit._tree import tensors_in
from tests.methods_under_test import build, method_names, state_tensors, tiny_model, train_step

METHODS = method_names()


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def all_finite(tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def batch(n=16):
    return torch.randn(n, 5), torch.randint(0, 3, (n,))


def warmed(name, steps=3, **kw):
    model = tiny_model()
    opt = build(name, model, **kw)
    x, y = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", curvkit.CurvkitWarning)
        for _ in range(steps):
            train_step(model, opt, x, y)
    return model, opt


def total(opt, counter):
    return sum(h[counter] for h in opt.health().values())


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_batch_skips_update_and_keeps_state(name, bad):
    model, opt = warmed(name)
    before = params_of(model)
    x, y = batch()
    x[3, 2] = bad  # one poisoned example: outputs, sampled evidence and gradient all non-finite
    with pytest.warns(curvkit.CurvkitWarning):
        train_step(model, opt, x, y)
    after = params_of(model)
    assert all_finite(after) and all_finite(state_tensors(opt))
    poisoned = [p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in model.parameters()]
    assert any(poisoned)
    for a, b, bad_grad in zip(before, after, poisoned):
        if bad_grad:  # a block whose gradient is not finite is not updated
            assert torch.equal(a, b)
    assert total(opt, "skipped_nonfinite_grad") > 0
    # training goes on afterwards
    train_step(model, opt, *batch())
    assert all_finite(params_of(model))


@pytest.mark.parametrize("name", METHODS)
def test_warnings_name_the_training_loop_line_not_library_internals(name):
    """Every CurvkitWarning is attributed to the first frame outside curvkit and torch: the
    caller's ``opt.step()`` (inside ``train_step``) or ``opt.health()``, not a line of the
    library or of ``optimizer.step``'s wrappers, whatever the depth of the call that warned."""
    import os

    import tests.methods_under_test as mut

    model, opt = warmed(name)
    x, y = batch()
    x[3, 2] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_step(model, opt, x, y)  # statistics and gradient faults: warned at the inversion step or...
        opt.health()  # ...here, at the next sync point
        x, y = batch()
        for b in opt.blocks:  # corrupted statistics: restarted at the next inversion
            for t in state_tensors_of_block(opt, b):
                t.fill_(float("nan"))
        for _ in range(3):
            train_step(model, opt, x, y)
        opt.health()
    ours = [w for w in caught if issubclass(w.category, curvkit.CurvkitWarning)]
    assert ours
    allowed = {os.path.abspath(__file__), os.path.abspath(mut.__file__)}
    for w in ours:
        assert os.path.abspath(w.filename) in allowed, (w.filename, w.lineno, str(w.message)[:80])


@pytest.mark.parametrize("name", METHODS)
def test_nonfinite_policy_raise(name):
    model = tiny_model()
    opt = build(name, model, nonfinite="raise")
    x, y = batch()
    train_step(model, opt, x, y)
    x[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        train_step(model, opt, x, y)


@pytest.mark.parametrize("name", METHODS)
def test_corrupted_statistics_keep_last_good_inverse(name):
    model, opt = warmed(name)
    for b in opt.blocks:
        for t in state_tensors_of_block(opt, b):
            t.fill_(float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", curvkit.CurvkitWarning)
        for _ in range(3):
            train_step(model, opt, *batch())
    assert all_finite(params_of(model))


def state_tensors_of_block(opt, block):
    return [t for t in tensors_in(opt.block_state(block)["estimator"]) if t.is_floating_point()]


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("case", ["zero_inputs", "single_example", "huge_scale", "tiny_scale"])
def test_degenerate_evidence_stays_finite(name, case):
    model = tiny_model()
    opt = build(name, model)
    scale = {"huge_scale": 1e15, "tiny_scale": 1e-15}.get(case, 1.0)
    n = 1 if case == "single_example" else 16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", curvkit.CurvkitWarning)
        for _ in range(4):
            x, y = batch(n)
            if case == "zero_inputs":
                x = torch.zeros_like(x)
            train_step(model, opt, x, y, loss_fn=lambda out, t: scale * nn.functional.cross_entropy(out, t))
    assert all_finite(params_of(model)) and all_finite(state_tensors(opt))


def test_failed_decomposition_retries_in_float64_then_more_damping_then_keeps_last():
    class Flaky(curvkit.DampedEigen):
        fail_below = torch.float64  # fails for float32 batches; float64 works unless told otherwise
        calls = []

        def invert(self, matrices, *, damping, order):
            Flaky.calls.append((matrices.dtype, float(damping.max())))
            if matrices.dtype != torch.float64 or float(damping.max()) < Flaky.needed:
                raise torch.linalg.LinAlgError("injected failure")
            return super().invert(matrices, damping=damping, order=order)

    model = tiny_model()
    opt = curvkit.compose(model.parameters(), estimator="tensor_normal", inverter=Flaky(), lr=1e-3, damping=0.1)
    x, y = batch()
    Flaky.needed = 0.0  # float64 retry succeeds
    with pytest.warns(curvkit.CurvkitWarning, match="float64"):
        train_step(model, opt, x, y)
    assert total(opt, "inverse_retry_float64") == 6 and total(opt, "inverse_extra_damping") == 0
    good = [list(opt.block_state(b)["inverses"]) for b in opt.blocks]
    Flaky.needed = 0.5  # needs 10x damping
    with pytest.warns(curvkit.CurvkitWarning, match="more damping"):
        train_step(model, opt, x, y)
    assert total(opt, "inverse_extra_damping") == 6 and total(opt, "inverse_kept_last") == 0
    Flaky.needed = 1e9  # nothing works: the last good inverse is kept
    with pytest.warns(curvkit.CurvkitWarning, match="last good"):
        train_step(model, opt, x, y)
    assert total(opt, "inverse_kept_last") == 6
    assert all_finite(params_of(model))
    assert good[0][0] is not None


@pytest.mark.parametrize("name", METHODS)
def test_exact_resume_every_method(name):
    x, y = batch()
    model = tiny_model(1)
    opt = build(name, model)
    for _ in range(4):
        train_step(model, opt, x, y)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for _ in range(5):
        train_step(model, opt, x, y)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    fresh = tiny_model(2)
    fresh.load_state_dict(ckpt["model"])
    opt2 = build(name, fresh)
    opt2.load_state_dict(ckpt["opt"])
    for _ in range(5):
        train_step(fresh, opt2, x, y)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("name", METHODS)
def test_resume_into_other_method_or_layout_is_refused(name):
    model, opt = warmed(name, steps=1)
    sd = opt.state_dict()
    other = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    with pytest.raises(ValueError):
        build(name, other).load_state_dict(sd)
    alien = curvkit.compose(tiny_model().parameters(), estimator="tensor_normal", inverter="cholesky")
    with pytest.raises(ValueError, match="saved with"):
        alien.load_state_dict(sd)
