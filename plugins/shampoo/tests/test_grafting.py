"""Grafting: the step takes its norm from the Adam / AdaGrad / SGD direction, its direction from
the Kronecker product; before start_step the graft direction alone is used."""

import copy

import pytest
import torch
from shampoo_reference import dense_direction

import curvkit
from curvkit.testing import check_preconditioner, make_block, roundtrip
from curvkit_shampoo import GraftedKronecker, Shampoo, tiled_block


def spd(d):
    x = torch.randn(d, d, dtype=torch.float64)
    return x @ x.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def reference_graft(kind, grads, bufs, t, beta2=0.999, delta=1e-8):
    """The graft direction at step t (1-based) from the gradient history, written out directly."""
    m = bufs[t - 1]
    if kind == "sgd":
        return m
    sq = torch.stack([g * g for g in grads[:t]])
    if kind == "adagrad":
        return m / (sq.sum(0).sqrt() + delta)
    weights = torch.tensor([(1 - beta2) * beta2 ** (t - 1 - s) for s in range(t)], dtype=torch.float64)
    v = (weights.reshape(-1, *[1] * m.dim()) * sq).sum(0) / (1 - beta2**t)
    return m / (v.sqrt() + delta)


@pytest.mark.parametrize("kind", ["adam", "adagrad", "sgd"])
@pytest.mark.parametrize("shape", [(6,), (4, 5), (3, 2, 4)])
def test_grafted_norm_equals_first_order_direction_norm(kind, shape):
    block = make_block(shape)
    pre = GraftedKronecker(graft=kind)
    state = pre.init_state(block)
    inverses = [spd(d) for d in shape]
    grads, bufs = [], []
    for t in range(1, 6):
        g = torch.randn(shape, dtype=torch.float64)
        grads.append(g)
        bufs.append(g if not bufs else 0.9 * bufs[-1] + g)
        out = pre.apply(block, state, bufs[-1], inverses, gradient=g)
        graft = reference_graft(kind, grads, bufs, t)
        kron = dense_direction(bufs[-1], inverses)
        assert torch.allclose(out.norm(), graft.norm(), rtol=1e-12)
        # the direction is the Kronecker one: out = c * kron with c > 0
        c = out.norm() / kron.norm()
        assert torch.allclose(out, c * kron, rtol=1e-10, atol=1e-14)


def test_start_step_uses_the_graft_direction_alone():
    shape = (4, 3)
    block = make_block(shape)
    pre = GraftedKronecker(graft="adam", start_step=3)
    state = pre.init_state(block)
    inverses = [spd(4), spd(3)]
    grads, bufs = [], []
    for t in range(1, 6):
        g = torch.randn(shape, dtype=torch.float64)
        grads.append(g)
        bufs.append(g)
        out = pre.apply(block, state, g, inverses, gradient=g)
        graft = reference_graft("adam", grads, bufs, t)
        if t <= 3:
            assert torch.allclose(out, graft, rtol=1e-12)
        else:
            assert not torch.allclose(out, graft, rtol=1e-3)
            assert torch.allclose(out.norm(), graft.norm(), rtol=1e-12)


def test_no_inverses_yet_falls_back_to_the_graft_direction_and_none_means_plain_kronecker():
    block = make_block((3, 2))
    m = torch.randn(3, 2, dtype=torch.float64)
    pre = GraftedKronecker(graft="sgd")
    assert torch.equal(pre.apply(block, pre.init_state(block), m, None, gradient=m), m)
    plain = GraftedKronecker(graft="none", start_step=1)
    state = plain.init_state(block)
    inverses = [spd(3), spd(2)]
    assert torch.equal(plain.apply(block, state, m, inverses, gradient=m), m)  # before start
    kron = curvkit.KroneckerMode().apply(block, {}, m, inverses, gradient=m)
    assert torch.allclose(plain.apply(block, state, m, inverses, gradient=m), kron, rtol=1e-14)


def test_zero_kronecker_direction_gives_zero_not_nan():
    block = make_block((3, 2))
    pre = GraftedKronecker(graft="adam")
    state = pre.init_state(block)
    z = torch.zeros(3, 2, dtype=torch.float64)
    out = pre.apply(block, state, z, [spd(3), spd(2)], gradient=torch.ones(3, 2, dtype=torch.float64))
    assert torch.equal(out, z)


@pytest.mark.parametrize("block_size", [None, 4])  # 4 splits 7 and 10 with zero padding
def test_optimizer_step_norm_is_the_sgd_step_norm_per_block(block_size):
    model = torch.nn.Linear(10, 7).double()
    opt = Shampoo(model.parameters(), lr=0.1, momentum=0.0, graft="sgd", block_size=block_size, model=model)
    x = torch.randn(16, 10, dtype=torch.float64)
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for p, b, g in zip(model.parameters(), before, grads):
            step = (b - p.detach()) / 0.1
            assert torch.allclose(step.norm(), g.norm(), rtol=1e-10)
            if p.dim() == 2:  # (a bias's first step is parallel to g: g is its Gram's eigenvector)
                assert not torch.allclose(step, g, rtol=1e-3)  # preconditioned, not plain SGD


@pytest.mark.parametrize("kind", ["adam", "adagrad", "sgd"])
def test_grafting_a_tiled_block_scales_the_per_tile_direction_to_the_graft_norm(kind):
    """A (7, 10) weight in 2 x 3 tiles of 4 x 4 (ragged): the direction is the per-tile Kronecker
    direction, built here tile by tile from the unpadded tiles, scaled to the norm of the whole
    parameter's graft direction; the padding stays zero; the state survives torch.save."""
    block = tiled_block("w", torch.nn.Parameter(torch.zeros(7, 10, dtype=torch.float64)), 0, block_size=4,
                        max_factor_dim=None)
    layout = block.layout
    pre = GraftedKronecker(graft=kind)
    state = pre.init_state(block)
    inverses = [spd(r) for _ in range(layout.num_tiles) for r in layout.tile_shape]
    grads, bufs = [], []
    for t in range(1, 4):
        g = torch.randn(7, 10, dtype=torch.float64)
        grads.append(g)
        bufs.append(g if not bufs else 0.9 * bufs[-1] + g)
        m, gv = layout.to_view([bufs[-1]]), layout.to_view([g])
        saved = (m.clone(), gv.clone(), [v.clone() for v in inverses])
        out = pre.apply(block, state, m, inverses, gradient=gv)
        assert torch.equal(m, saved[0]) and torch.equal(gv, saved[1])
        assert all(torch.equal(v, w) for v, w in zip(inverses, saved[2]))
        assert out[7:].abs().sum() == 0 and out[:, 10:].abs().sum() == 0
        (real,) = layout.from_view(out)
        kron = torch.zeros(7, 10, dtype=torch.float64)
        for i, s in enumerate(layout.tile_slices()):
            d = [x.stop - x.start for x in s]
            kron[s] = dense_direction(bufs[-1][s], [v[:n, :n] for v, n in zip(inverses[2 * i : 2 * i + 2], d)])
        graft = reference_graft(kind, grads, bufs, t)
        assert torch.allclose(real.norm(), graft.norm(), rtol=1e-12)
        assert torch.allclose(real, real.norm() / kron.norm() * kron, rtol=1e-10, atol=1e-14)
    m, gv = layout.to_view([torch.randn(7, 10, dtype=torch.float64)]), layout.to_view([torch.randn(7, 10)])
    a = pre.apply(block, copy.deepcopy(state), m, inverses, gradient=gv.double())
    b = pre.apply(block, roundtrip(state), m, inverses, gradient=gv.double())
    assert torch.equal(a, b)


@pytest.mark.parametrize("options", [{"graft": "adam"}, {"graft": "adagrad", "start_step": 2},
                                     {"graft": "sgd"}, {"graft": "none", "start_step": 1}])
def test_conforms(options):
    check_preconditioner(GraftedKronecker(**options))
    check_preconditioner(GraftedKronecker(**options), dtype=torch.float32)


@pytest.mark.parametrize(
    "options, message",
    [({"graft": "rmsprop"}, "graft must be one of"), ({"beta2": 1.0}, "beta2"),
     ({"graft_epsilon": 0}, "graft_epsilon"), ({"start_step": -1}, "start_step")],
)
def test_invalid_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        GraftedKronecker(**options)
