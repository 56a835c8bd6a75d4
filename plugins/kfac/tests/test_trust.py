"""Trust items of kfac: output-only sampled backward, missing evidence, tied weights, attention,
param-group splits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvkit
import curvkit_kfac
from curvkit import BlockEvidence, LayerRecorder
from kfac_reference import conv2d_factors, deterministic_loss, linear_factors

TOL = dict(rtol=1e-10, atol=1e-12)


def _output_only(monkeypatch, opt):
    """Spy on the engine's output-only sampled backward: the recorder's ``differentiate`` runs,
    and no gradient with respect to a parameter is ever asked for."""
    real_grad, real_diff = torch.autograd.grad, type(opt._recorder).differentiate
    params = {id(p) for p in opt.model.parameters()}
    calls = []

    def grad(outputs, inputs, *args, **kwargs):
        seq = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        assert not any(id(t) in params for t in seq), "the sampled backward computed parameter gradients"
        return real_grad(outputs, inputs, *args, **kwargs)

    def differentiate(self, value, seed=None):
        calls.append(1)
        return real_diff(self, value, seed)

    monkeypatch.setattr(torch.autograd, "grad", grad)
    monkeypatch.setattr(type(opt._recorder), "differentiate", differentiate)
    return calls


def test_kfac_declares_what_it_reads():
    spec = curvkit_kfac.KFACEstimator().evidence
    assert spec.layer_io and not spec.layer_outputs and not spec.parameter_gradients


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_factors_unchanged_by_the_output_only_backward(monkeypatch, kind):
    layer, x, targets, A_ref, G_ref = _reference_case(kind)
    opt = curvkit.compose(layer.parameters(), estimator="kfac", model=layer, damping=0.1)
    calls = _output_only(monkeypatch, opt)
    out = layer(x)
    assert opt.update_curvature(out, loss=deterministic_loss(targets))
    assert calls == [1]
    state = opt.block_state(0)["estimator"]
    torch.testing.assert_close(state["A"], A_ref, **TOL)
    torch.testing.assert_close(state["G"], G_ref, **TOL)
    assert opt._recorder._live == []  # held outputs dropped after the backward



def _reference_case(kind):
    """A float64 Linear or Conv2d layer, its input, targets and the reference A and G."""
    if kind == "linear":
        layer = nn.Linear(5, 3).double()
        x = torch.randn(7, 5, dtype=torch.float64)
        targets = torch.randn(7, 3, dtype=torch.float64)
        A_ref, G_ref = linear_factors(layer, x, targets)
    else:
        layer = nn.Conv2d(2, 3, 3, stride=2, padding=1).double()
        x = torch.randn(4, 2, 7, 6, dtype=torch.float64)
        targets = torch.randn_like(layer(x))
        A_ref, G_ref = conv2d_factors(layer, x, targets)
    return layer, x, targets, A_ref, G_ref


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_factors_match_the_reference_through_the_split_gram(monkeypatch, kind):
    """KFAC's A and G summed by curvkit.contractions.add_gram_ on column halves (the path large
    CPU factors take) equal the per-example reference."""
    import curvkit.contractions

    monkeypatch.setattr(curvkit.contractions, "SPLIT_GRAM_MIN", 2)
    layer, x, targets, A_ref, G_ref = _reference_case(kind)
    opt = curvkit.compose(layer.parameters(), estimator="kfac", model=layer, damping=0.1)
    assert opt.update_curvature(layer(x), loss=deterministic_loss(targets))
    state = opt.block_state(0)["estimator"]
    torch.testing.assert_close(state["A"], A_ref, **TOL)
    torch.testing.assert_close(state["G"], G_ref, **TOL)

def test_update_reports_a_layer_that_got_no_records():
    class Bypass(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 3)
            self.bypassed = nn.Linear(3, 2)

        def forward(self, x):  # calls the weight directly, as nn.MultiheadAttention does
            return F.linear(torch.tanh(self.used(x)), self.bypassed.weight, self.bypassed.bias)

    model = Bypass()
    est = curvkit_kfac.KFACEstimator()
    blocks = est.plan([(n, p, 0) for n, p in model.named_parameters()], model=model, max_factor_dim=None)
    rec = LayerRecorder([b.module for b in blocks], root=model)
    out = model(torch.randn(5, 4))
    with rec.phase("sampled"):
        torch.autograd.grad(out.square().sum(), list(model.parameters()))
    results = {}
    for b in blocks:
        state = est.init_state(b)
        results[b.name] = est.update(b, state, BlockEvidence(gradients=[None] * len(b.params), layer=rec))
    assert results == {"used": None, "bypassed": False}


def test_multihead_attention_is_planned_as_fallback_with_a_reason():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0])

    model = Attn()
    opt = curvkit_kfac.KFAC(model)
    kinds = {b.name: b.kind for b in opt.blocks}
    assert kinds["head"] == "kronecker"
    assert all(kinds[n] == curvkit_kfac.FALLBACK_KIND for n in kinds if n.startswith("attn"))
    assert "out_proj.forward" in str(opt.block_plan())
    with pytest.raises(ValueError, match=r"attn\.out_proj\.weight.*MultiheadAttention"):
        curvkit_kfac.KFAC(model, fallback="error")


def test_tied_weight_statistics_come_from_every_use():
    first, second = nn.Linear(4, 4, bias=False).double(), nn.Linear(4, 4).double()
    second.weight = first.weight
    model = nn.Sequential(first, nn.Tanh(), second)
    est = curvkit_kfac.KFACEstimator()
    named = [(n, p, 0) for n, p in model.named_parameters()]
    blocks = est.plan(named, model=model, max_factor_dim=None)
    (block,) = [b for b in blocks if b.kind == "kronecker"]
    uses = curvkit_kfac.planning.layer_modules(block)
    assert uses == (first, second) and block.params == (first.weight,)
    rec = LayerRecorder(list(uses), root=model)
    x = torch.randn(6, 4, dtype=torch.float64)
    targets = torch.randn(6, 4, dtype=torch.float64)
    out = model(x)
    with rec.phase("sampled"):
        torch.autograd.grad(deterministic_loss(targets)(out), [first.weight])
    state = est.init_state(block)
    assert est.update(block, state, BlockEvidence(gradients=[None], layer=rec, batch_size=6)) is None
    # reference, written out: per example, both calls' inputs and per-example output gradients
    rows_a, rows_g = [], []
    for n in range(6):
        xn = x[n : n + 1]
        h = first(xn)
        h.retain_grad()
        u = torch.tanh(h)
        o = second(u)
        o.retain_grad()
        (torch.sin(o) * targets[n : n + 1]).sum().backward()
        rows_a += [xn[0], u[0].detach()]
        rows_g += [h.grad[0], o.grad[0]]
    A_ref = sum(torch.outer(a, a) for a in rows_a) / len(rows_a)
    G_ref = sum(torch.outer(g, g) for g in rows_g) / len(rows_g)
    torch.testing.assert_close(state["A"], A_ref, **TOL)
    torch.testing.assert_close(state["G"], G_ref, **TOL)


def test_weight_tied_to_an_unfactored_module_falls_back():
    class Holder(nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.weight = weight

        def forward(self, x):
            return x @ self.weight

    head = nn.Linear(4, 5, bias=False)
    model = nn.Sequential(head, Holder(head.weight))
    opt = curvkit_kfac.KFAC(model)
    assert [b.kind for b in opt.blocks] == [curvkit_kfac.FALLBACK_KIND]
    assert "also used by '1'" in str(opt.block_plan())
    emb = nn.Embedding(5, 4)  # the usual tied language-model head: two kinds of layer
    head = nn.Linear(4, 5, bias=False)
    head.weight = emb.weight
    opt = curvkit_kfac.KFAC(nn.Sequential(emb, head))
    assert [b.kind for b in opt.blocks] == [curvkit_kfac.FALLBACK_KIND]
    assert "different kinds" in str(opt.block_plan())


def test_no_weight_decay_on_biases_keeps_every_layer_block():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = curvkit_kfac.KFAC([{"params": decay, "weight_decay": 1e-2}, {"params": no_decay, "weight_decay": 0.0}],
                            model=model)
    assert [(b.kind, b.shape, b.group) for b in opt.blocks] == [("kronecker", (4, 4), 0), ("kronecker", (2, 5), 0)]


def test_embedding_factors_match_brute_force():
    emb = nn.Embedding(6, 3).double()
    head = nn.Linear(3, 2).double()
    model = nn.Sequential(emb, nn.Tanh(), head)
    ids = torch.tensor([[0, 2, 2], [5, 0, 2]])
    targets = torch.randn(2, 3, 2, dtype=torch.float64)
    opt = curvkit_kfac.KFAC(model)
    block = opt.blocks[0]
    assert block.name == "0" and block.shape == (6, 3) and block.kind == "kronecker"
    assert "Embedding: A = diag(counts) (vocabulary) x G (dim)" in str(opt.block_plan())
    out = model(ids)
    assert opt.update_curvature(out, loss=deterministic_loss(targets))
    state = opt.block_state(block)["estimator"]
    # reference: every token position is an example; one-hot inputs, per-example output gradients
    rows = ids.reshape(-1)
    onehot = torch.eye(6, dtype=torch.float64)[rows]
    A_ref = onehot.T @ onehot / rows.numel()
    grads = []
    for n in range(ids.shape[0]):
        e = emb(ids[n : n + 1]).detach().requires_grad_(True)
        o = head(torch.tanh(e))
        (g,) = torch.autograd.grad((torch.sin(o) * targets[n : n + 1]).sum(), e)
        grads.append(g.reshape(-1, 3))
    g = torch.cat(grads)
    G_ref = g.T @ g / rows.numel()
    factors = opt.estimator.factors(block, state, damping=0.3)
    torch.testing.assert_close(factors[0].matrix, A_ref, **TOL)
    torch.testing.assert_close(factors[1].matrix, G_ref, **TOL)
    loss = deterministic_loss(targets)(out)
    opt.zero_grad()
    loss.backward()
    opt.step()  # the direction uses the (vocabulary, dim) factors
    assert all(torch.isfinite(p).all() for p in model.parameters())
