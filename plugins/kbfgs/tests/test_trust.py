"""K-BFGS trust items: the second forward pass and stochastic modules, shared planning."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import curvkit
from curvkit_kbfgs import KBFGS, KBFGSL


@pytest.mark.parametrize("module", [nn.BatchNorm1d(8), nn.Dropout(0.2)], ids=["batchnorm", "dropout"])
def test_warns_once_about_modules_the_closure_disturbs(module):
    model = nn.Sequential(nn.Linear(4, 8), module, nn.Linear(8, 2))
    with pytest.warns(curvkit.CurvkitWarning, match=r"'1' \((BatchNorm1d|Dropout)\).*training mode") as record:
        opt = KBFGS(model)
    assert len([w for w in record if issubclass(w.category, curvkit.CurvkitWarning)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", curvkit.CurvkitWarning)
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})  # planned again: no second warning
        model.eval()
        KBFGSL(model)  # eval mode: nothing to warn about
        KBFGS(nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.0), nn.Linear(8, 2)))  # p = 0: no second mask


def test_no_weight_decay_on_biases_keeps_every_layer_block():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = KBFGS([{"params": decay, "weight_decay": 1e-2}, {"params": no_decay, "weight_decay": 0.0}], model=model)
    assert [(b.kind, b.shape, b.group) for b in opt.blocks] == [("kronecker", (4, 4), 0), ("kronecker", (2, 5), 0)]


def test_attention_is_refused_by_name():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 1)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0])

    with pytest.raises(ValueError, match=r"attn\.out_proj\.weight.*MultiheadAttention.*unsupported='fallback'"):
        KBFGS(Attn(), unsupported="error")


def test_update_reports_a_layer_that_got_no_records():
    from curvkit import BlockEvidence, LayerRecorder
    from curvkit_kbfgs import KBFGSEstimator

    class Bypass(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 3)
            self.bypassed = nn.Linear(3, 2)

        def forward(self, x):
            return nn.functional.linear(torch.tanh(self.used(x)), self.bypassed.weight, self.bypassed.bias)

    model = Bypass()
    est = KBFGSEstimator()
    blocks = est.plan([(n, p, 0) for n, p in model.named_parameters()], model=model, max_factor_dim=None)
    rec = LayerRecorder([b.module for b in blocks], root=model, keep_outputs=True)
    model(torch.randn(5, 4)).sum().backward()
    results = {b.name: est.update(b, est.init_state(b), BlockEvidence(gradients=[None, None], layer=rec))
               for b in blocks}
    assert results == {"used": None, "bypassed": False}
