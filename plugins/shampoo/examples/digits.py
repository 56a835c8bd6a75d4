"""Shampoo on scikit-learn's bundled digits (1,797 real 8x8 images): an autoencoder and a CNN.

Prints the full-data training loss after each epoch for Shampoo (the TNT authors' settings, and
with an Adam graft) and Adam, all with the same initialisation and batches.

    .venv/bin/python plugins/shampoo/examples/digits.py --epochs 10
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from curvkit_shampoo import Shampoo


def autoencoder() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16), nn.Linear(16, 48), nn.ReLU(),
                         nn.Linear(48, 64))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


def ae_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """BCE with logits summed over pixels, mean over the batch (the paper's autoencoder loss)."""
    return F.binary_cross_entropy_with_logits(model(x), x, reduction="sum") / x.shape[0]


def cnn_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x.reshape(-1, 1, 8, 8)), y)


def train(problem: str, method: str, *, epochs: int, lr: float, batch: int, seed: int) -> list[float]:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    torch.manual_seed(seed)
    model = autoencoder() if problem == "autoencoder" else cnn()
    loss_fn = ae_loss if problem == "autoencoder" else cnn_loss
    if method == "shampoo":
        opt = Shampoo(model.parameters(), lr=lr, model=model)
    elif method == "shampoo+adam-graft":
        opt = Shampoo(model.parameters(), lr=lr, graft="adam", model=model)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            loss_fn(model, x[idx], y[idx]).backward()
            opt.step()
        with torch.no_grad():
            losses.append(float(loss_fn(model, x, y)))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = [("shampoo", 3e-4), ("shampoo", 3e-3), ("shampoo+adam-graft", 3e-3), ("adam", 3e-3)]
    for problem in ("autoencoder", "cnn"):
        for method, lr in runs:
            start = time.perf_counter()
            losses = train(problem, method, epochs=args.epochs, lr=lr, batch=args.batch, seed=args.seed)
            finite = all(math.isfinite(v) for v in losses)
            shown = " ".join(f"{v:.3f}" for v in losses)
            print(f"{problem:11s} {method:19s} lr={lr:g}  finite={finite}  {time.perf_counter() - start:5.1f}s  "
                  f"loss per epoch: {shown}")


if __name__ == "__main__":
    main()
