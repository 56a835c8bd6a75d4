"""Shampoo trains real data (scikit-learn's bundled digits) without NaN: an autoencoder and a CNN."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvkit_shampoo import Shampoo


def digits():
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(data.target)


def fit(model, opt, loss_fn, x, y, *, epochs, batch=128):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        losses = [float(loss_fn(model, x, y))]
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            loss_fn(model, x[idx], y[idx]).backward()
            opt.step()
        with torch.no_grad():
            losses.append(float(loss_fn(model, x, y)))
    assert all(math.isfinite(v) for v in losses), losses
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return losses


@pytest.mark.parametrize("options", [{}, {"graft": "adam", "block_size": 32}])
def test_shampoo_trains_the_digits_autoencoder(options):
    x, y = digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16), nn.Linear(16, 48), nn.ReLU(),
                          nn.Linear(48, 64))

    def loss_fn(m, xb, yb):
        return F.binary_cross_entropy_with_logits(m(xb), xb, reduction="sum") / len(xb)

    losses = fit(model, Shampoo(model.parameters(), lr=3e-3, model=model, **options), loss_fn, x, y, epochs=3)
    assert losses[-1] < 0.6 * losses[0], losses


def test_shampoo_trains_a_digits_cnn():
    x, y = digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))

    def loss_fn(m, xb, yb):
        return F.cross_entropy(m(xb.reshape(-1, 1, 8, 8)), yb)

    losses = fit(model, Shampoo(model.parameters(), lr=3e-3, model=model), loss_fn, x, y, epochs=3)
    assert losses[-1] < 0.5, losses
