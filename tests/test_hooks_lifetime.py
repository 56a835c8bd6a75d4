"""LayerRecorder: hook lifetime, pickling, keep_outputs and the output-only backward."""

from __future__ import annotations

import gc
import io
import weakref

import pytest
import torch
from torch import nn

from curvkit.hooks import LayerRecorder


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _linears(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def test_hooks_leave_with_the_recorder():
    model = _mlp()
    rec = LayerRecorder(_linears(model), root=model)
    assert _hook_count(model) == 3
    model(torch.randn(4, 5)).sum().backward()
    seen = weakref.ref(rec[model[0]].inputs[0])
    del rec
    gc.collect()
    assert _hook_count(model) == 0
    assert seen() is None  # the last batch's activations are not kept alive


def test_rebuilding_does_not_pile_up_hooks():
    model = _mlp()
    recorders = []
    for _ in range(50):
        recorders = [LayerRecorder(_linears(model), root=model)]  # the previous one is dropped
        model(torch.randn(2, 5))
    gc.collect()
    assert _hook_count(model) == 3
    recorders.clear()
    gc.collect()
    assert _hook_count(model) == 0


def test_remove_removes_everything():
    model = _mlp()
    rec = LayerRecorder(_linears(model), root=model, keep_outputs=True)
    model(torch.randn(4, 5))
    assert rec[model[2]].inputs and rec._live
    rec.remove()
    assert _hook_count(model) == 0 and not rec.active
    assert not rec[model[2]].inputs and not rec[model[2]].outputs and not rec._live
    model(torch.randn(4, 5))
    assert not rec[model[2]].inputs
    rec.remove()  # idempotent


def test_torch_save_of_a_watched_model():
    model = _mlp()
    rec = LayerRecorder(_linears(model), root=model)
    buf = io.BytesIO()
    torch.save(model, buf)  # old hooks held a local closure: "Can't pickle local object"
    buf.seek(0)
    clone = torch.load(buf, weights_only=False)
    out = clone(torch.randn(3, 5))  # the reloaded hooks are inert
    out.sum().backward()
    assert not rec[model[0]].inputs
    x = torch.randn(3, 5)
    torch.testing.assert_close(clone(x), model(x))


def test_keep_outputs_only_when_asked():
    model = _mlp()
    x = torch.randn(4, 5)
    off = LayerRecorder(_linears(model), root=model)
    on = LayerRecorder(_linears(model), root=model, keep_outputs=True)
    model(x)
    assert off[model[0]].outputs == [] and len(on[model[0]].outputs) == 1
    with pytest.raises(ValueError, match="keep_outputs"):
        LayerRecorder(_linears(model), keep_outputs=1)


def test_differentiate_files_what_the_hooks_file():
    """differentiate() gives the output gradients an ordinary backward gives, without touching the
    weight gradients."""
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    layers = _linears(model)
    x = torch.randn(6, 5, dtype=torch.float64)
    rec = LayerRecorder(layers, root=model)
    out = model(x)
    value = (out.sin() * torch.arange(3, dtype=torch.float64)).sum()
    with rec.phase("sampled"):
        torch.autograd.grad(value, list(model.parameters()), retain_graph=True)
    expected = [rec[m].grads("sampled")[0].clone() for m in layers]
    for m in layers:
        rec[m].output_grads["sampled"][0] = None
    weight_grads = []
    for p in model.parameters():
        p.register_hook(lambda g: weight_grads.append(g))
    with rec.phase("sampled"):
        rec.differentiate(value)
    assert weight_grads == []  # no parameter gradient was computed
    for m, e in zip(layers, expected):
        torch.testing.assert_close(rec[m].grads("sampled")[0], e, rtol=0, atol=0)
        assert rec[m].grads("minibatch") == [None]
    assert rec._live == []  # held outputs dropped after use
    out.sum().backward()  # the graph was retained for the user's backward
    assert all(p.grad is not None for p in model.parameters())
    # a second forward through a layer called twice: one gradient per call
    rec.clear()
    lin = layers[1]
    y = lin(torch.tanh(lin(torch.randn(2, 7, dtype=torch.float64))))
    with rec.phase("sampled"):
        rec.differentiate(y.square().sum())
    assert len(rec[lin].grads("sampled")) == 2 and all(g is not None for g in rec[lin].grads("sampled"))


def test_differentiate_refuses_non_scalars():
    model = _mlp()
    rec = LayerRecorder(_linears(model), root=model)
    with pytest.raises(ValueError, match="scalar"):
        rec.differentiate(model(torch.randn(2, 5)))
