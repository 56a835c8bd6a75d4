"""KFAC factors against per-example brute force (loops over examples and positions, float64)."""

import pytest
import torch
from torch import nn

import curvkit
from kfac_reference import conv2d_factors, deterministic_loss, linear_factors

TOL = dict(rtol=1e-10, atol=1e-12)


def _factors_after_one_update(model, x, targets, **estimator_options):
    opt = curvkit.compose(
        model.parameters(), estimator="kfac", model=model, estimator_options=estimator_options, damping=0.1
    )
    out = model(x)
    assert opt.update_curvature(out, loss=deterministic_loss(targets))
    state = opt.block_state(0)["estimator"]
    return opt, state["A"], state["G"]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(7,), (3, 4)], ids=["batch", "batch-and-sequence"])
def test_linear_factors_match_brute_force(bias, lead):
    layer = nn.Linear(5, 3, bias=bias).double()
    x = torch.randn(*lead, 5, dtype=torch.float64)
    targets = torch.randn(*lead, 3, dtype=torch.float64)
    opt, A, G = _factors_after_one_update(layer, x, targets)
    A_ref, G_ref = linear_factors(layer, x, targets)
    assert opt.blocks[0].shape == (3, 5 + bias)
    torch.testing.assert_close(A, A_ref, **TOL)
    torch.testing.assert_close(G, G_ref, **TOL)


CONVS = {
    "plain": dict(in_channels=2, out_channels=3, kernel_size=3),
    "stride2-pad1-nobias": dict(in_channels=2, out_channels=4, kernel_size=3, stride=2, padding=1, bias=False),
    "rect-stride-pad-dilation": dict(in_channels=3, out_channels=2, kernel_size=(2, 3), stride=(2, 1),
                                     padding=(1, 2), dilation=(2, 1)),
    "same-even-kernel": dict(in_channels=2, out_channels=3, kernel_size=4, padding="same"),
    "reflect-padding": dict(in_channels=2, out_channels=3, kernel_size=3, padding=1, padding_mode="reflect"),
    "circular-stride": dict(in_channels=1, out_channels=2, kernel_size=3, stride=2, padding=2, padding_mode="circular"),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name", list(CONVS))
def test_conv2d_factors_match_kfc_brute_force(name):
    conv = nn.Conv2d(**CONVS[name]).double()
    x = torch.randn(4, conv.in_channels, 7, 6, dtype=torch.float64)
    targets = torch.randn_like(conv(x))
    opt, A, G = _factors_after_one_update(conv, x, targets)
    A_ref, G_ref = conv2d_factors(conv, x, targets)
    torch.testing.assert_close(A, A_ref, **TOL)
    torch.testing.assert_close(G, G_ref, **TOL)


def test_layer_called_twice_counts_both_calls_as_examples():
    layer = nn.Linear(4, 3).double()

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(torch.tanh(self.layer(x) @ torch.ones(3, 4, dtype=x.dtype)))

    model = Twice()
    x = torch.randn(5, 4, dtype=torch.float64)
    targets = torch.randn(5, 3, dtype=torch.float64)
    opt = curvkit.compose(model.parameters(), estimator="kfac", model=model)
    out = model(x)
    opt.update_curvature(out, loss=deterministic_loss(targets))
    state = opt.block_state(0)["estimator"]
    # reference: per example, the inputs of both calls and the output gradients of both calls
    rows_a, rows_g = [], []
    for n in range(5):
        xn = x[n : n + 1].clone()
        h = layer(xn)
        h.retain_grad()
        u = torch.tanh(h @ torch.ones(3, 4, dtype=x.dtype))
        o = layer(u)
        o.retain_grad()
        (torch.sin(o) * targets[n : n + 1]).sum().backward()
        rows_a += [torch.cat([xn[0], torch.ones(1, dtype=x.dtype)]), torch.cat([u[0].detach(), torch.ones(1, dtype=x.dtype)])]
        rows_g += [h.grad[0], o.grad[0]]
    A_ref = sum(torch.outer(a, a) for a in rows_a) / len(rows_a)
    G_ref = sum(torch.outer(g, g) for g in rows_g) / len(rows_g)
    torch.testing.assert_close(state["A"], A_ref, **TOL)
    torch.testing.assert_close(state["G"], G_ref, **TOL)


def test_ema_first_update_sets_then_decays():
    layer = nn.Linear(3, 2).double()
    xs = [torch.randn(6, 3, dtype=torch.float64) for _ in range(2)]
    ts = [torch.randn(6, 2, dtype=torch.float64) for _ in range(2)]
    opt = curvkit.compose(layer.parameters(), estimator="kfac", model=layer, estimator_options={"stat_decay": 0.7},
                          lr=0.0)
    for x, t in zip(xs, ts):
        out = layer(x)
        opt.zero_grad()
        opt.update_curvature(out, loss=deterministic_loss(t))
        out.sum().backward()
        opt.step()
    refs = [linear_factors(layer, x, t) for x, t in zip(xs, ts)]
    state = opt.block_state(0)["estimator"]
    torch.testing.assert_close(state["A"], 0.7 * refs[0][0] + 0.3 * refs[1][0], **TOL)
    torch.testing.assert_close(state["G"], 0.7 * refs[0][1] + 0.3 * refs[1][1], **TOL)


def test_gradient_scale_option_replaces_the_batch_size():
    layer = nn.Linear(4, 2).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    targets = torch.randn(8, 2, dtype=torch.float64)
    _, _, G = _factors_after_one_update(layer, x, targets, gradient_scale=2.0)
    _, G_ref = linear_factors(layer, x, targets)
    torch.testing.assert_close(G, G_ref * (2.0 / 8) ** 2, **TOL)


def test_empirical_evidence_uses_the_users_backward_in_step():
    layer = nn.Linear(4, 3).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    targets = torch.randn(6, 3, dtype=torch.float64)
    opt = curvkit.compose(layer.parameters(), estimator="kfac", model=layer,
                          estimator_options={"evidence": "empirical"})
    out = layer(x)
    assert opt.update_curvature(out, loss="mse") is False  # minibatch evidence: collected in step()
    assert opt.block_state(0)["estimator"]["updates"] == 0
    deterministic_loss(targets)(out).backward()
    opt.step()
    state = opt.block_state(0)["estimator"]
    A_ref = torch.cat([x, torch.ones(6, 1, dtype=x.dtype)], 1)
    A_ref = A_ref.T @ A_ref / 6
    g = torch.cos(out.detach()) * targets  # per-example d l_n / d s_n of the true-label loss
    torch.testing.assert_close(state["A"], A_ref, **TOL)
    torch.testing.assert_close(state["G"], g.T @ g / 6, **TOL)
