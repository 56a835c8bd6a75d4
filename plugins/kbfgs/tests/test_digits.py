"""K-BFGS and K-BFGS(L) train a small autoencoder on scikit-learn's real digits (8x8) without NaN.

64-32-16-32-64 (ReLU, linear code and output), binary cross-entropy with logits summed over the
pixels and averaged over batches of 256, the presets' defaults (the paper's MNIST settings),
3 epochs. Also checks that the BFGS-tracked H_a stays close to (A + sqrt(lambda) I)^-1.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import curvkit_kbfgs

datasets = pytest.importorskip("sklearn.datasets")


def autoencoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.Linear(16, 32), nn.ReLU(),
                         nn.Linear(32, 64))


def bce(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(out, x, reduction="sum") / x.shape[0]


def relative_error(h: torch.Tensor, a: torch.Tensor, damping: float) -> float:
    ref = torch.linalg.inv(a.double() + math.sqrt(damping) * torch.eye(len(a), dtype=torch.float64))
    return float(torch.linalg.norm(h.double() - ref) / torch.linalg.norm(ref))


@pytest.mark.parametrize("preset,options", [(curvkit_kbfgs.KBFGS, {}), (curvkit_kbfgs.KBFGSL, {"memory": 10})])
def test_digits_autoencoder_trains_and_h_a_tracks_its_inverse(preset, options):
    data = torch.tensor(datasets.load_digits().data, dtype=torch.float32) / 16.0
    model = autoencoder()
    opt = preset(model, **options)
    with torch.no_grad():
        initial = float(bce(model(data), data))
    gen = torch.Generator().manual_seed(1)
    first_inverse = {}
    for _ in range(3):
        perm = torch.randperm(len(data), generator=gen)
        for i in range(0, len(data) - 255, 256):
            x = data[perm[i:i + 256]]

            def closure():
                opt.zero_grad()
                loss = bce(model(x), x)
                loss.backward()
                return loss

            loss = opt.step(closure)
            assert math.isfinite(float(loss.detach()))
            first_inverse = first_inverse or {b.name: opt.block_state(b)["estimator"]["Ha"].clone() for b in opt.blocks}
    with torch.no_grad():
        final = float(bce(model(data), data))
    # measured: 43.95 -> 27.92 (K-BFGS) after 21 steps; untuned Adam (lr 1e-3) 40.6
    assert final < 0.7 * initial
    tracked, frozen = [], []
    for b in opt.blocks:
        st = opt.block_state(b)["estimator"]
        assert st["counts"]["resets"] == 0 and st["counts"]["g_pairs"] == 21
        tracked.append(relative_error(st["Ha"], st["A"], st["damping"]))
        frozen.append(relative_error(first_inverse[b.name], st["A"], st["damping"]))
    # measured: tracked <= 0.09, the first inverse kept unchanged drifts to 0.22
    assert max(tracked) < 0.15
    worst = max(range(len(frozen)), key=frozen.__getitem__)
    assert tracked[worst] < 0.5 * frozen[worst]
