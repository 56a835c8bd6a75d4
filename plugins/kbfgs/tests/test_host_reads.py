"""Steady-state K-BFGS / K-BFGS(L) steps read no tensor value on the host in the plugin's code.

``Tensor.item``, ``tolist``, ``__bool__``, ``__float__`` and ``__int__`` are patched to count calls
made while the estimator's methods run (the engine's own reads are the lead's and not counted),
on steps after warm-up with no refresh of the direction's factors due.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from torch import nn

from curvkit_kbfgs import KBFGS, KBFGSL

READS = ("item", "tolist", "__bool__", "__float__", "__int__")


@contextlib.contextmanager
def count_host_reads(monkeypatch, owners):
    """Count host reads made inside the methods ``owners`` lists (``(object, method name)``)."""
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


def _steps(model, opt, xs, ys):
    for x, y in zip(xs, ys):
        def closure(x=x, y=y):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)


@pytest.mark.parametrize("preset", [KBFGS, KBFGSL], ids=["KBFGS", "KBFGS_L"])
def test_no_host_reads_in_steady_state_steps(monkeypatch, preset):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = preset(model, lr=0.05, invert_every=4)
    xs = [torch.randn(10, 6) for _ in range(8)]
    ys = [torch.randint(0, 3, (10,)) for _ in range(8)]
    _steps(model, opt, xs[:5], ys[:5])  # warm-up: steps 0..4 (H_a inverted once at step 0)
    est = opt.estimator
    rec = opt._recorder
    owners = [(est, "update"), (est, "factors"), (est, "after_step"), (rec, "_record_call"), (rec, "_file_grad")]
    with count_host_reads(monkeypatch, owners) as counter:
        _steps(model, opt, xs[5:], ys[5:])  # steps 5, 6, 7: no factor refresh due
    assert counter["n"] == 0, counter["where"]
    st = opt.block_state(0)["estimator"]
    assert int(st["counts"]["g_pairs"] + st["counts"]["g_skipped"]) == 8  # the steps did fold pairs
