"""Blocking: modes over block_size split into (chunks, size), zero-padded, shared statistics."""

import pytest
import torch
from shampoo_reference import inverse_root

from curvkit_shampoo import ChunkedLayout, Shampoo, chunk_sizes


@pytest.mark.parametrize("d, b, expected", [(1000, 256, (4, 250)), (784, 256, (4, 196)), (7, 3, (3, 3)),
                                            (8, 4, (2, 4)), (5, 4, (2, 3))])
def test_chunk_sizes(d, b, expected):
    n, r = chunk_sizes(d, b)
    assert (n, r) == expected and r <= b and n * r >= d and n * r - d < n


def test_layout_pads_with_zeros_and_round_trips():
    layout = ChunkedLayout((7, 2, 3, 1), (7, 2, 3), ((3, 3), None, (2, 2)))
    assert layout.view_shape == (3, 3, 2, 2, 2) and layout.padded_shape == (9, 2, 4)
    w = torch.randn(7, 2, 3, 1)
    view = layout.to_view([w])
    assert view.shape == (3, 3, 2, 2, 2)
    padded = view.reshape(9, 2, 4)
    assert torch.equal(padded[:7, :, :3], w.reshape(7, 2, 3))
    assert padded[7:].abs().sum() == 0 and padded[:, :, 3:].abs().sum() == 0
    (back,) = layout.from_view(view)
    assert torch.equal(back, w)
    dirty = torch.randn(3, 3, 2, 2, 2)
    clean = layout.clean(dirty).reshape(9, 2, 4)
    assert torch.equal(clean[:7, :, :3], dirty.reshape(9, 2, 4)[:7, :, :3])
    assert clean[7:].abs().sum() == 0 and clean[:, :, 3:].abs().sum() == 0


def test_plan_splits_only_large_modes():
    model = torch.nn.Sequential(torch.nn.Linear(10, 7), torch.nn.Conv2d(2, 3, 2))
    opt = Shampoo(model.parameters(), model=model, block_size=4)
    shapes = {b.name: (b.shape, b.factored) for b in opt.blocks}
    assert shapes["0.weight"] == ((2, 4, 3, 4), (False, True, False, True))
    assert shapes["0.bias"] == ((2, 4), (False, True))
    assert shapes["1.weight"] == ((3, 2, 4), (True, True, True))  # no mode over 4
    assert "block_size=4" in str(opt.block_plan())
    state = opt.block_state(0)["estimator"]
    assert [None if s is None else tuple(s.shape) for s in state["grams"]] == [None, (4, 4), None, (4, 4)]


def test_blocked_direction_matches_a_chunk_by_chunk_reference():
    """One step on a (7, 10) weight with block_size 4: rows padded to 2 x 4, columns to 3 x 4;
    L sums the row chunks' Grams, R the column chunks'; each tile gets L^(-1/8) G_ab R^(-1/8)
    (the view has order k = 4)."""
    w = torch.nn.Parameter(torch.randn(7, 10, dtype=torch.float64))
    eps, lr = 1e-2, 0.1
    opt = Shampoo([w], lr=lr, damping=eps, block_size=4, root_solver="coupled_newton")
    g = torch.randn(7, 10, dtype=torch.float64)
    before = w.detach().clone()
    w.grad = g.clone()
    opt.step()
    gp = torch.zeros(8, 12, dtype=torch.float64)
    gp[:7, :10] = g
    left = sum(gp[4 * a : 4 * a + 4] @ gp[4 * a : 4 * a + 4].T for a in range(2))
    right = sum(gp[:, 4 * b : 4 * b + 4].T @ gp[:, 4 * b : 4 * b + 4] for b in range(3))
    vl, vr = inverse_root(left, eps, 8), inverse_root(right, eps, 8)
    direction = torch.zeros(8, 12, dtype=torch.float64)
    for a in range(2):
        for b in range(3):
            direction[4 * a : 4 * a + 4, 4 * b : 4 * b + 4] = vl @ gp[4 * a : 4 * a + 4, 4 * b : 4 * b + 4] @ vr.T
    expected = before - lr * direction[:7, :10]
    assert torch.allclose(w.detach(), expected, rtol=1e-9, atol=1e-12)


def test_block_size_at_least_every_mode_changes_nothing():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 5).double()
    twin = torch.nn.Linear(6, 5).double()
    twin.load_state_dict(model.state_dict())
    a = Shampoo(model.parameters(), lr=0.1, damping=1e-2)
    b = Shampoo(twin.parameters(), lr=0.1, damping=1e-2, block_size=6)
    x = torch.randn(8, 6, dtype=torch.float64)
    for _ in range(3):
        for m, o in ((model, a), (twin, b)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)
