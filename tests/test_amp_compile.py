"""Mixed precision and compiled models: every method under bf16 autocast keeps float32 statistics
and finite parameters; TNT with fp16 and a GradScaler; TNT on a torch.compile'd model."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import curvkit
from curvkit._tree import tensors_in
from tests.methods_under_test import build, method_names


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))
    return model, torch.randn(32, 12), torch.randint(0, 4, (32,))


@pytest.mark.parametrize("name", method_names())
def test_every_method_under_bf16_autocast_keeps_float32_statistics(name):
    model, x, y = model_and_data()
    opt = build(name, model)

    def closure():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", curvkit.CurvkitWarning)
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
                loss = nn.functional.cross_entropy(out.float(), y)
                opt.zero_grad()
                opt.update_curvature(out.float(), loss="cross_entropy")
            loss.backward()
            opt.step(closure if opt.needs_closure else None)
    stats = [t for b in opt.blocks for t in tensors_in(opt.block_state(b)["estimator"]) if t.is_floating_point()]
    assert stats or name == "Muon", name  # Muon keeps no curvature statistics
    assert all(t.dtype == torch.float32 for t in stats), name
    assert all(bool(torch.isfinite(t).all()) for t in stats)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_tnt_with_fp16_style_grad_scaler():
    model, x, y = model_and_data()
    ref = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))
    ref.load_state_dict(model.state_dict())
    opt, ref_opt = curvkit.TNT(model, lr=1e-2, seed=1), curvkit.TNT(ref, lr=1e-2, seed=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(3):
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        opt.update_curvature(out, loss="cross_entropy")  # the sampled pass is not scaled
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # unscale before the curvature step reads the gradient
        scaler.step(opt)
        scaler.update()
        out = ref(x)
        loss = nn.functional.cross_entropy(out, y)
        ref_opt.zero_grad()
        ref_opt.update_curvature(out, loss="cross_entropy")
        loss.backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_tnt_on_a_compiled_model_equals_eager():
    model, x, y = model_and_data()
    eager = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))
    eager.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="aot_eager")
    opt, ref = curvkit.TNT(model, lr=1e-2, seed=2), curvkit.TNT(eager, lr=1e-2, seed=2)
    for net, o in ((compiled, opt), (eager, ref)):
        for _ in range(3):
            out = net(x)
            loss = nn.functional.cross_entropy(out, y)
            o.zero_grad()
            assert o.update_curvature(out, loss="cross_entropy")
            loss.backward()
            o.step()
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
