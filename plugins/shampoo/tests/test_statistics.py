"""Shampoo statistics: EMA / running sum of mode Grams, warm start, state validation."""

import pytest
import torch
from shampoo_reference import unfold

from curvkit_shampoo import Shampoo


@pytest.mark.parametrize("accumulate", ["ema", "sum"])
def test_warm_start_sets_the_exact_mean_of_the_minibatch_grams(accumulate):
    w = torch.nn.Parameter(torch.randn(3, 2, 4, dtype=torch.float64))
    opt = Shampoo([w], accumulate=accumulate)
    xs = [torch.randn(3, 2, 4, dtype=torch.float64) for _ in range(3)]
    used = opt.warm_start(xs, lambda x: (w * x).sum())  # gradient of the loss = x
    assert used == 3
    state = opt.block_state(0)["estimator"]
    factors = opt.estimator.factors(opt.blocks[0], state, damping=0.0)
    for i in range(3):
        mean = sum(unfold(x, i) @ unfold(x, i).T for x in xs) / 3
        expected = mean * (3 if accumulate == "sum" else 1)  # the sum of the three Grams
        assert torch.allclose(factors[i].matrix, expected, rtol=1e-12)
    # the first step then takes no new statistics
    w.grad = torch.randn_like(w)
    opt.step()
    assert state["updates"] == 3


@pytest.mark.parametrize("shape, message", [((7, 6), "block layout"), ((8, 6), "does not fit 1 tile")])
def test_state_of_another_plan_is_rejected(shape, message):
    """(7, 6) tiled by 4 has the padded view (8, 6); (8, 6) tiled by 4 keeps its view, and the
    per-tile statistics (4, 4, 4) are refused by the untiled block (1, 8, 8) and vice versa."""
    a = Shampoo([torch.nn.Parameter(torch.randn(shape))], block_size=4, graft="sgd")
    b = Shampoo([torch.nn.Parameter(torch.randn(shape))], graft="sgd")
    for opt in (a, b):
        opt.param_groups[0]["params"][0].grad = torch.randn(shape)
        opt.step()
    with pytest.raises(ValueError, match=message):
        b.load_state_dict(a.state_dict())
    if shape == (8, 6):
        with pytest.raises(ValueError, match="does not fit 4 tile"):
            a.load_state_dict(b.state_dict())
