"""Steady-state KFAC steps read no tensor value on the host in the plugin's code (the estimator
and the layer recorder's hooks); the engine's own reads are the lead's and not counted."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvkit_kfac
from curvkit.testing import count_host_reads

@pytest.mark.parametrize("pi_damping", [False, True])
def test_no_host_reads_in_steady_state_steps(pi_damping):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    opt = curvkit_kfac.KFAC(model, invert_every=4, pi_damping=pi_damping)

    def step(x, y):
        out = model(x)
        opt.zero_grad()
        opt.update_curvature(out, loss="cross_entropy")
        nn.functional.cross_entropy(out, y).backward()
        opt.step()

    data = [(torch.randn(6, 1, 6, 6), torch.randint(0, 4, (6,))) for _ in range(8)]
    for x, y in data[:5]:
        step(x, y)
    est, rec = opt.estimator, opt._recorder
    owners = [(est, "update"), (est, "batch_statistics"), (est, "fold"), (est, "factors"), (rec, "_record_call"), (rec, "_file_grad"), (rec, "differentiate")]
    with count_host_reads(owners) as counter:
        for x, y in data[5:]:
            step(x, y)
    assert counter.count == 0, counter.where
    assert opt.block_state(0)["estimator"]["updates"] == 8
