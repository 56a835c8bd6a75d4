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


def test_state_of_another_plan_is_rejected():
    a = Shampoo([torch.nn.Parameter(torch.randn(8, 6))], block_size=4)
    b = Shampoo([torch.nn.Parameter(torch.randn(8, 6))])
    a.param_groups[0]["params"][0].grad = torch.randn(8, 6)
    a.step()
    with pytest.raises(ValueError, match="block layout"):
        b.load_state_dict(a.state_dict())
