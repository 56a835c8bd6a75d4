"""Steady-state KFAC steps read no tensor value on the host in the plugin's code (the estimator
and the layer recorder's hooks); the engine's own reads are the lead's and not counted."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from torch import nn

import curvkit_kfac

READS = ("item", "tolist", "__bool__", "__float__", "__int__")


@contextlib.contextmanager
def count_host_reads(monkeypatch, owners):
    counter = {"n": 0, "on": 0, "where": []}
    for name in READS:
        original = getattr(torch.Tensor, name)

        def patched(self, *args, _original=original, _name=name, **kwargs):
            if counter["on"]:
                counter["n"] += 1
                counter["where"].append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, patched)
    for obj, method in owners:
        if not hasattr(obj, method):  # (an older recorder without this hook body)
            continue
        bound = getattr(obj, method)

        @functools.wraps(bound)
        def wrapped(*args, _bound=bound, **kwargs):
            counter["on"] += 1
            try:
                return _bound(*args, **kwargs)
            finally:
                counter["on"] -= 1

        monkeypatch.setattr(obj, method, wrapped)
    yield counter


@pytest.mark.parametrize("pi_damping", [False, True])
def test_no_host_reads_in_steady_state_steps(monkeypatch, pi_damping):
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
    owners = [(est, "update"), (est, "factors"), (rec, "_record_call"), (rec, "_file_grad"), (rec, "differentiate")]
    with count_host_reads(monkeypatch, owners) as counter:
        for x, y in data[5:]:
            step(x, y)
    assert counter["n"] == 0, counter["where"]
    assert opt.block_state(0)["estimator"]["updates"] == 8
