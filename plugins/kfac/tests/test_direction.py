"""The KFAC direction against the dense Kronecker product (torch.kron, float64) on the momentum."""

import math

import pytest
import torch
from torch import nn

import curvkit
import curvkit_kfac
from kfac_reference import deterministic_loss


def _view(layer: nn.Module, tensors) -> torch.Tensor:
    """(out, in_flat [+ 1]) view of weight-shaped and bias-shaped tensors, written out by hand."""
    w = tensors[0].reshape(tensors[0].shape[0], -1)
    return torch.cat([w, tensors[1][:, None]], dim=1) if len(tensors) == 2 else w


def _two_steps(model, x, opt, lr):
    """Two steps with deterministic losses; returns (momentum views, directions) per layer."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    momentum = [None] * len(layers)
    for t in range(2):
        out = model(x)
        opt.zero_grad()
        opt.update_curvature(out, loss=deterministic_loss(torch.randn_like(out)))
        deterministic_loss(torch.randn_like(out))(out).backward()
        before = [[p.detach().clone() for p in l.parameters()] for l in layers]
        grads = [_view(l, [p.grad for p in l.parameters()]) for l in layers]
        momentum = [g if m is None else 0.9 * m + g for m, g in zip(momentum, grads)]
        opt.step()
    directions = [
        _view(l, [(b - p.detach()) / lr for b, p in zip(bs, l.parameters())]) for l, bs in zip(layers, before)
    ]
    return layers, momentum, directions


def _dense(A, G, M, dA, dG):
    eye = lambda d: torch.eye(d, dtype=torch.float64)  # noqa: E731
    left = torch.linalg.inv(G + dG * eye(G.shape[0])) if G is not None else eye(M.shape[0])
    right = torch.linalg.inv(A + dA * eye(A.shape[0])) if A is not None else eye(M.shape[1])
    # row-major vec: vec(L M R) = (L kron R^T) vec(M), R symmetric; torch.kron (2.13) fails on the
    # column-major results of inv when paired with a contiguous matrix, hence .contiguous()
    dense = torch.kron(left.contiguous(), right.contiguous())
    return (dense @ M.reshape(-1)).reshape(M.shape)


@pytest.mark.parametrize("pi_damping", [False, True])
@pytest.mark.parametrize("inverter", ["damped_eigen", "cholesky"])
def test_direction_is_dense_kronecker_inverse_times_momentum(pi_damping, inverter):
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(12, 4), nn.Tanh(), nn.Linear(4, 3, bias=False)).double()
    x = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    lam, lr = 0.3, 0.5
    opt = curvkit_kfac.KFAC(model, lr=lr, damping=lam, pi_damping=pi_damping, inverter=inverter)
    layers, momentum, directions = _two_steps(model, x, opt, lr)
    for block, M, P in zip(opt.blocks, momentum, directions):
        state = opt.block_state(block)["estimator"]
        A, G = state["A"], state["G"]
        pi = 1.0
        if pi_damping:
            pi = math.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]))
        expected = _dense(A, G, M, pi * math.sqrt(lam), math.sqrt(lam) / pi)
        torch.testing.assert_close(P, expected, rtol=1e-8, atol=1e-10)


def test_unfactored_input_mode_gets_the_full_damping():
    model = nn.Sequential(nn.Linear(9, 3)).double()
    x = torch.randn(5, 9, dtype=torch.float64)
    lam, lr = 0.2, 1.0
    opt = curvkit.compose(model.parameters(), estimator="kfac", model=model, lr=lr, damping=lam,
                          inverter_options={"power": 1.0}, max_factor_dim=8)
    assert opt.blocks[0].factored == (True, False)
    _, momentum, directions = _two_steps(model, x, opt, lr)
    state = opt.block_state(0)["estimator"]
    assert state["A"] is None
    torch.testing.assert_close(directions[0], _dense(None, state["G"], momentum[0], 0.0, lam), rtol=1e-8, atol=1e-10)


def test_fallback_blocks_take_the_plain_momentum_direction():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    lr = 0.5
    opt = curvkit_kfac.KFAC(model, lr=lr)
    norm = model[1]
    grads = []
    for t in range(2):
        out = model(x)
        opt.zero_grad()
        opt.update_curvature(out, loss="mse")
        (out ** 2).sum().backward()
        grads.append([p.grad.clone() for p in norm.parameters()])
        before = [p.detach().clone() for p in norm.parameters()]
        opt.step()
    for b, p, g0, g1 in zip(before, norm.parameters(), grads[0], grads[1]):
        torch.testing.assert_close((b - p.detach()) / lr, 0.9 * g0 + g1, rtol=1e-12, atol=1e-14)
