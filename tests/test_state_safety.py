"""State that is never lost or silently corrupted: pickling, healing statistics and momentum,
validated loads, option checks on load, odd parameters, checkpoints matched by position."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import curvkit
from curvkit.engine.checkpoint import block_states, set_block_state
from tests.methods_under_test import build, train_step

D = torch.float64


def model_and_data(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    return model, torch.randn(16, 6), torch.randint(0, 3, (16,))


def finite(tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


@pytest.mark.parametrize("name", ["TNT", "KFAC", "Shampoo"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copied_optimizer_steps_exactly_as_the_original(name, how):
    model, x, y = model_and_data()
    opt = build(name, model)
    for _ in range(3):
        train_step(model, opt, x, y)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    elif how == "pickle":
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    else:
        buf = io.BytesIO()
        torch.save((model, opt), buf)
        buf.seek(0)
        model2, opt2 = torch.load(buf, weights_only=False)
    for _ in range(3):
        train_step(model, opt, x, y)
        train_step(model2, opt2, x, y)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert opt2.step_count == opt.step_count


def test_non_finite_statistics_are_restarted_and_inverses_heal():
    model, x, y = model_and_data()
    opt = curvkit.TNT(model, lr=1e-2, invert_every=2)
    for _ in range(3):
        train_step(model, opt, x, y)
    st = opt.block_state(0)["estimator"]
    st["grams"][0].fill_(float("inf"))  # what an overflowing Gram leaves behind
    with pytest.warns(curvkit.CurvkitWarning, match="restarted"):
        for _ in range(2):
            train_step(model, opt, x, y)
    assert opt.health()["0.weight"]["statistics_restarted"] == 1
    assert finite(block_states(opt.state_dict())[0]["estimator"]["grams"])
    before = opt.block_state(0)["inverses"][0].clone()
    for _ in range(3):  # the block gets fresh statistics and inverses again (it is not frozen)
        train_step(model, opt, x, y)
    assert not torch.equal(before, opt.block_state(0)["inverses"][0])
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_huge_finite_evidence_never_reaches_the_statistics():
    model, x, y = model_and_data()
    opt = curvkit.TNT(model, lr=1e-2)
    train_step(model, opt, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", curvkit.CurvkitWarning)
        out = model(x)
        opt.zero_grad()
        opt.update_curvature(out, loss=lambda o, g: 1e20 * nn.functional.cross_entropy(o, y))
        nn.functional.cross_entropy(out, y).backward()
        opt.step()
    h = opt.health()
    assert sum(c["skipped_nonfinite_evidence"] + c["statistics_restarted"] for c in h.values()) > 0
    assert all(finite(s["estimator"]["grams"]) for s in block_states(opt.state_dict()))


def test_non_finite_momentum_is_reset_not_frozen():
    model, x, y = model_and_data()
    opt = curvkit.TNT(model, lr=1e-2, invert_every=2)
    for _ in range(3):
        train_step(model, opt, x, y)
    opt.block_state(0)["momentum"].fill_(float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", curvkit.CurvkitWarning)
        for _ in range(2):
            train_step(model, opt, x, y)
    assert opt.health()["0.weight"]["momentum_reset"] == 1
    w = model[0].weight.detach().clone()
    train_step(model, opt, x, y)
    assert not torch.equal(w, model[0].weight)  # the block moves again
    assert bool(torch.isfinite(opt.block_state(0)["momentum"]).all())


def test_loading_non_finite_state_warns_and_restarts_or_raises_when_strict():
    model, x, y = model_and_data()
    opt = curvkit.TNT(model, lr=1e-2)
    train_step(model, opt, x, y)
    sd = opt.state_dict()
    st = block_states(sd)[1]
    st["estimator"]["grams"][0][0] = float("nan")
    set_block_state(sd, 1, st)
    fresh = curvkit.TNT(model, lr=1e-2)
    with pytest.warns(curvkit.CurvkitWarning, match="non-finite"):
        fresh.load_state_dict(sd)
    assert fresh.health()["0.bias"]["statistics_restarted"] == 1
    with pytest.raises(ValueError, match="non-finite"):
        curvkit.TNT(model, lr=1e-2, strict=True).load_state_dict(sd)


def test_options_that_change_the_meaning_of_the_state_are_refused_others_warned():
    model, x, y = model_and_data()
    opt = curvkit.TNT(model, lr=1e-2)
    train_step(model, opt, x, y)
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="evidence"):
        curvkit.TNT(model, evidence="empirical").load_state_dict(sd)
    root = curvkit.compose(model, estimator="tensor_normal", inverter="damped_eigen",
                           inverter_options={"power": "1/2k"})
    with pytest.raises(ValueError, match="power"):
        root.load_state_dict(sd)
    with pytest.warns(curvkit.CurvkitWarning, match="stat_decay"):
        curvkit.TNT(model, stat_decay=0.95).load_state_dict(sd)


def test_checkpoint_loads_by_position_across_naming():
    """Saved from model.parameters() (names group0.param0...) or a wrapped model's names."""
    model, x, y = model_and_data()
    opt = curvkit.TNT(list(model.parameters()), lr=1e-2)
    train_step(model, opt, x, y)
    sd = opt.state_dict()
    named = curvkit.TNT(model, lr=1e-2)
    named.load_state_dict(sd)
    wrapped = nn.Sequential()
    wrapped.add_module("module", model)
    curvkit.TNT(wrapped, lr=1e-2).load_state_dict(named.state_dict())


def test_zero_element_parameters_complex_groups_and_resized_parameters():
    empty = nn.Parameter(torch.zeros(0, 3))
    w = nn.Parameter(torch.randn(4, 3))
    opt = curvkit.TNT([empty, w], lr=1e-2)
    opt.update_curvature(grads=[torch.zeros(0, 3), torch.randn(4, 3)])
    empty.grad, w.grad = torch.zeros(0, 3), torch.randn(4, 3)
    opt.step()
    assert not any(opt.blocks[0].factored)
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2, dtype=torch.complex64))]})
    w.data = torch.randn(5, 3)
    w.grad = torch.randn(5, 3)
    with pytest.raises(ValueError, match="changed shape"):
        opt.step()


def test_a_model_is_accepted_wherever_parameters_are():
    model, x, y = model_and_data()
    opt = curvkit.TNT(model, lr=1e-2)
    assert opt.model is model and opt.blocks[0].name == "0.weight"
    train_step(model, opt, x, y)


def test_close_and_garbage_collection_remove_layer_hooks():
    model, x, y = model_and_data()

    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    base = hooks()
    opt = build("KFAC", model)
    train_step(model, opt, x, y)
    assert hooks() > base
    opt.close()
    assert hooks() == base
    for _ in range(5):
        opt = build("KFAC", model)
        train_step(model, opt, x, y)
    del opt
    gc.collect()
    assert hooks() == base
