"""Steady-state K-BFGS / K-BFGS(L) steps read no tensor value on the host in the plugin's code.

``Tensor.item``, ``tolist``, ``__bool__``, ``__float__`` and ``__int__`` are patched to count calls
made while the estimator's methods run (the engine's own reads are the lead's and not counted),
on steps after warm-up with no refresh of the direction's factors due.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvkit.testing import count_host_reads
from curvkit_kbfgs import KBFGS, KBFGSL

def _steps(model, opt, xs, ys):
    for x, y in zip(xs, ys):
        def closure(x=x, y=y):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)


@pytest.mark.parametrize("preset", [KBFGS, KBFGSL], ids=["KBFGS", "KBFGS_L"])
def test_no_host_reads_in_steady_state_steps(preset):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = preset(model, lr=0.05, invert_every=4)
    xs = [torch.randn(10, 6) for _ in range(8)]
    ys = [torch.randint(0, 3, (10,)) for _ in range(8)]
    _steps(model, opt, xs[:5], ys[:5])  # warm-up: steps 0..4 (H_a inverted once at step 0)
    est = opt.estimator
    rec = opt._recorder
    owners = [(est, "update"), (est, "factors"), (est, "after_step"), (rec, "_record_call"), (rec, "_file_grad")]
    with count_host_reads(owners) as counter:
        _steps(model, opt, xs[5:], ys[5:])  # steps 5, 6, 7: no factor refresh due
    assert counter.count == 0, counter.where
    st = opt.block_state(0)["estimator"]
    assert int(st["counts"]["g_pairs"] + st["counts"]["g_skipped"]) == 8  # the steps did fold pairs


@pytest.mark.parametrize("preset", [KBFGS, KBFGSL], ids=["KBFGS", "KBFGS_L"])
def test_the_presets_check_the_state_every_20_steps_and_read_nothing_in_between(preset):
    """With the presets' defaults, the whole step (engine included) reads the host once per 20
    steps: the direction needs no inversion, only the periodic state check reads."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = preset(model, lr=0.05)
    assert opt.param_groups[0]["invert_every"] == 20
    xs = [torch.randn(10, 6) for _ in range(24)]
    ys = [torch.randint(0, 3, (10,)) for _ in range(24)]
    _steps(model, opt, xs[:21], ys[:21])  # steps 0..20 (the check at 20 included)
    with count_host_reads() as counter:
        _steps(model, opt, xs[21:], ys[21:])  # steps 21, 22, 23
    assert counter.count == 0, counter.where
