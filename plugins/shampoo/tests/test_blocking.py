"""Blocking: large parameters split into tiles, each with its own statistics and roots, checked
against Shampoo run tile by tile on the unpadded tiles (dense float64 references)."""

import pytest
import torch
from shampoo_reference import ReferenceShampoo, dense_direction, unfold

import curvkit
from curvkit_shampoo import Shampoo, TiledLayout, kronecker_direction, tile_sizes, tiled_block

# (param shape, its default view): a matrix, a vector and a conv weight, all tiled with ragged tiles
SHAPES = [((7, 10), (7, 10)), ((9,), (9,)), ((5, 2, 3, 3), (5, 2, 9))]
BLOCK = 4  # 7 -> 4 + 3, 10 -> 4 + 4 + 2, 9 -> 3 + 3 + 3, 5 -> 3 + 2, 2 stays whole


def spd(d, shift=0.1):
    x = torch.randn(d, d, dtype=torch.float64)
    return x @ x.T / d + shift * torch.eye(d, dtype=torch.float64)


@pytest.mark.parametrize("d, b, expected", [(1000, 256, (4, 250)), (784, 256, (4, 196)), (7, 3, (3, 3)),
                                            (8, 4, (2, 4)), (5, 4, (2, 3)), (10, 4, (3, 4))])
def test_tile_sizes(d, b, expected):
    n, r = tile_sizes(d, b)
    assert (n, r) == expected and r <= b and n * r >= d > (n - 1) * r


def test_layout_pads_with_zeros_round_trips_and_lists_its_tiles():
    layout = TiledLayout((7, 2, 3, 1), (7, 2, 3), (2, 1, 2), (4, 2, 2))
    assert layout.view_shape == (8, 2, 4) and layout.split_shape == (2, 4, 1, 2, 2, 2)
    assert layout.num_tiles == 4 and layout.factor_sizes == (4, 2, 2) * 4
    w = torch.randn(7, 2, 3, 1)
    view = layout.to_view([w])
    assert view.shape == (8, 2, 4)
    assert torch.equal(view[:7, :, :3], w.reshape(7, 2, 3))
    assert view[7:].abs().sum() == 0 and view[:, :, 3:].abs().sum() == 0
    (back,) = layout.from_view(view)
    assert torch.equal(back, w)
    dirty = torch.randn(8, 2, 4)
    clean = layout.clean(dirty)
    assert torch.equal(clean[:7, :, :3], dirty[:7, :, :3])
    assert clean[7:].abs().sum() == 0 and clean[:, :, 3:].abs().sum() == 0
    slices = layout.tile_slices()  # row-major grid order, ragged tiles shorter
    assert slices == [(slice(0, 4), slice(0, 2), slice(0, 2)), (slice(0, 4), slice(0, 2), slice(2, 3)),
                      (slice(4, 7), slice(0, 2), slice(0, 2)), (slice(4, 7), slice(0, 2), slice(2, 3))]
    cover = torch.zeros(7, 2, 3)
    for s in slices:
        cover[s] += 1
    assert torch.equal(cover, torch.ones(7, 2, 3))


@pytest.mark.parametrize("grid, tile", [((2,), (3,)), ((3,), (4,)), ((1, 2), (7, 4)), ((2, 1), (7, 10))])
def test_layout_rejects_a_grid_that_does_not_tile_the_view(grid, tile):
    base = (7,) if len(grid) == 1 else (7, 10)
    with pytest.raises(ValueError, match="do not tile"):
        TiledLayout(base, base, grid, tile)


def test_plan_shows_the_tiling_and_statistics_have_a_tile_dimension():
    model = torch.nn.Sequential(torch.nn.Linear(10, 7), torch.nn.Conv2d(2, 3, 2))
    opt = Shampoo(model.parameters(), model=model, block_size=BLOCK)
    blocks = {b.name: b for b in opt.blocks}
    assert (blocks["0.weight"].shape, blocks["0.weight"].factored) == ((8, 12), (True, True))
    assert blocks["0.weight"].order == 2  # the tile's own order: roots -1/4
    assert (blocks["0.bias"].shape, blocks["0.bias"].layout.grid) == ((8,), (2,))
    assert isinstance(blocks["1.weight"].layout, curvkit.ReshapeLayout)  # no mode over 4: untouched
    plan = str(opt.block_plan())
    assert "2 x 3 tiles of 4 x 4 (block_size=4, padded from 7 x 10) with statistics per tile" in plan
    assert "2 tiles of 4 (block_size=4, padded from 7)" in plan
    grams = opt.block_state(0)["estimator"]["grams"]
    assert [tuple(s.shape) for s in grams] == [(6, 4, 4), (6, 4, 4)]
    assert [tuple(s.shape) for s in opt.block_state(2)["estimator"]["grams"]] == [(1, 3, 3), (1, 2, 2), (1, 4, 4)]
    small = Shampoo(model.parameters(), model=model, block_size=BLOCK, max_factor_dim=3)
    tiled = small.blocks[0]
    assert tiled.factored == (False, False) and "tile modes > max_factor_dim=3 unfactored" in tiled.rule
    assert small.block_state(0)["estimator"]["grams"] == [None, None]


@pytest.mark.parametrize("accumulate", ["ema", "sum"])
def test_each_tile_keeps_the_ema_of_its_own_grams(accumulate):
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s, _ in SHAPES]
    opt = Shampoo(params, block_size=BLOCK, accumulate=accumulate, stat_decay=0.7)
    history = []
    for _ in range(3):
        grads = [torch.randn(s, dtype=torch.float64) for s, _ in SHAPES]
        history.append(grads)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    for i, (b, (_, view)) in enumerate(zip(opt.blocks, SHAPES)):
        state = opt.block_state(b)["estimator"]
        factors = opt.estimator.factors(b, state, damping=0.1)
        k, slices = b.order, b.layout.tile_slices()
        assert len(factors) == len(slices) * k
        for t, s in enumerate(slices):
            for mode in range(k):
                tiles = [h[i].reshape(view)[s] for h in history]
                grams = [unfold(x, mode) @ unfold(x, mode).T for x in tiles]
                if accumulate == "ema":
                    expected = grams[0]
                    for h in grams[1:]:
                        expected = 0.7 * expected + 0.3 * h
                else:
                    expected = sum(grams)
                d = expected.shape[0]
                stat = state["grams"][mode][t]
                f = factors[t * k + mode]
                assert f.damping == 0.1 and f.matrix.shape == stat.shape == (b.layout.tile_shape[mode],) * 2
                assert torch.allclose(f.matrix[:d, :d], expected, rtol=1e-12, atol=1e-14)
                assert f.matrix[d:].abs().sum() == 0 and f.matrix[:, d:].abs().sum() == 0  # padding


def run_against_tile_references(opt_kwargs, ref_kwargs, *, steps, tol):
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s, _ in SHAPES]
    opt = Shampoo(params, block_size=BLOCK, **opt_kwargs)
    assert [b.order for b in opt.blocks] == [len(v) for _, v in SHAPES]
    slices = [b.layout.tile_slices() for b in opt.blocks]
    expected = [p.detach().clone().reshape(v) for p, (_, v) in zip(params, SHAPES)]
    refs = [[ReferenceShampoo(tuple(x.stop - x.start for x in s), **ref_kwargs) for s in sl] for sl in slices]
    for t in range(steps):
        grads = [torch.randn(s, dtype=torch.float64) for s, _ in SHAPES]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, (p, g, (_, view)) in enumerate(zip(params, grads, SHAPES)):
            nxt = expected[i].clone()
            for s, ref in zip(slices[i], refs[i]):  # Shampoo on every (unpadded) tile on its own
                nxt[s] = ref.step(expected[i][s], g.reshape(view)[s])
            expected[i] = nxt
            err = (p.detach().reshape(view) - nxt).abs().max() / nxt.abs().max()
            assert err < tol, f"step {t}, param {SHAPES[i][0]}: relative error {err:.2e}"


@pytest.mark.parametrize("root_solver", ["coupled_newton", "eigen"])
def test_blocked_updates_equal_shampoo_run_tile_by_tile(root_solver):
    """Every tile t of a matrix moves by (L_t + eps I)^(-1/4) M_t (R_t + eps I)^(-1/4) (the root of
    the tile's own order), with its own EMA statistics, momentum and root schedule; ragged tiles
    included."""
    run_against_tile_references(
        dict(lr=0.1, damping=1e-2, momentum=0.9, curvature_every=1, invert_every=3, root_solver=root_solver),
        dict(lr=0.1, eps=1e-2, momentum=0.9, t1=1, t2=3), steps=6, tol=1e-9,
    )


def test_blocked_updates_with_sum_relative_epsilon_and_schedules_equal_the_tile_references():
    run_against_tile_references(
        dict(lr=0.05, damping=1e-3, momentum=0.5, curvature_every=2, invert_every=5, accumulate="sum",
             relative_damping=True, weight_decay=0.1),
        dict(lr=0.05, eps=1e-3, momentum=0.5, t1=2, t2=5, accumulate="sum", relative=True, weight_decay=0.1),
        steps=7, tol=1e-7,  # power-method lambda_max of each tile: ~1e-9 relative
    )


def test_kronecker_direction_applies_each_tiles_own_inverses():
    param = torch.nn.Parameter(torch.zeros(7, 10, dtype=torch.float64))
    block = tiled_block("w", param, 0, block_size=BLOCK, max_factor_dim=None)
    layout = block.layout
    m = layout.to_view([torch.randn(7, 10, dtype=torch.float64)])  # zero on the padding, like the buffer
    inverses = [spd(r) for _ in range(layout.num_tiles) for r in layout.tile_shape]
    inverses[1] = None  # tile 0, mode 1: identity (an inversion that had no previous inverse to keep)
    out = kronecker_direction(block, m, inverses)
    assert out.shape == m.shape and out[7:].abs().sum() == 0 and out[:, 10:].abs().sum() == 0
    for t, s in enumerate(layout.tile_slices()):
        d = [x.stop - x.start for x in s]
        roots = [None if v is None else v[:n, :n] for v, n in zip(inverses[2 * t : 2 * t + 2], d)]
        assert torch.allclose(out[s], dense_direction(m[s], roots), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="needs 12 inverses"):
        kronecker_direction(block, m, inverses[:2])


def test_kronecker_mode_refuses_per_tile_inverses_and_the_preset_picks_a_tiled_preconditioner():
    w = torch.nn.Parameter(torch.randn(7, 10, dtype=torch.float64))
    assert Shampoo([w], block_size=BLOCK).preconditioner.name == "grafted_kronecker"
    assert Shampoo([w]).preconditioner.name == "kronecker_mode"
    opt = curvkit.compose([w], estimator="shampoo", estimator_options={"block_size": BLOCK},
                          inverter="coupled_newton", preconditioner="kronecker_mode")
    w.grad = torch.randn_like(w)
    with pytest.raises(ValueError, match="one matrix"):
        opt.step()


def test_block_size_at_least_every_mode_changes_nothing():
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
        assert torch.equal(p, q)
