"""End to end on real data: the digits autoencoder (scikit-learn's bundled 8x8 digits).

TNT (lr 1e-3, damping 0.1, T1 = 1, T2 = 20, batch 100) must reach a lower training loss after
20 epochs than the best of a small learning-rate grid of SGD with momentum and of Adam, trained
with the same initial weights and the same data order.
"""

import pytest
import torch
from torch import nn

import curvkit

sklearn_datasets = pytest.importorskip("sklearn.datasets")

EPOCHS, BATCH = 20, 100


def data():
    x = torch.tensor(sklearn_datasets.load_digits().data, dtype=torch.float32) / 16.0
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm][:1400]


def make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 8),
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 64),
    )


def bce_sum(out, x):
    return nn.functional.binary_cross_entropy_with_logits(out, x, reduction="sum") / x.shape[0]


def train(make_opt, xtr, seed):
    model = make_model(seed)
    opt = make_opt(model)
    for epoch in range(EPOCHS):
        order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(xtr), BATCH):
            x = xtr[order[i : i + BATCH]]
            out = model(x)
            loss = bce_sum(out, x)
            opt.zero_grad()
            if isinstance(opt, curvkit.CurvatureOptimizer):
                opt.update_curvature(out, loss="bce_with_logits")
            loss.backward()
            opt.step()
    with torch.no_grad():
        return bce_sum(model(xtr), xtr).item()


@pytest.mark.parametrize("seed", [0, 1])
def test_tnt_beats_sgd_momentum_and_adam_on_digits_autoencoder(seed):
    xtr = data()
    tnt = train(lambda m: curvkit.TNT(m.parameters(), lr=1e-3, damping=0.1, seed=seed), xtr, seed)
    sgd = min(train(lambda m, lr=lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), xtr, seed)
              for lr in (0.01, 0.03, 0.1))
    adam = min(train(lambda m, lr=lr: torch.optim.Adam(m.parameters(), lr=lr), xtr, seed)
               for lr in (0.003, 0.01, 0.02))
    print(f"seed {seed}: TNT {tnt:.3f}  best SGD-m {sgd:.3f}  best Adam {adam:.3f}")
    assert tnt < adam and tnt < sgd
