"""KFAC on scikit-learn's bundled digits: a 64-32-16-32-64 autoencoder and a small CNN.

Run ``python plugins/kfac/examples/digits.py [--epochs N]``; it prints the training loss per
epoch (autoencoder: BCE-with-logits summed over pixels, mean over the batch; CNN: cross-entropy
and training accuracy) and the time per epoch.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import curvkit_kfac


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(data.target)


def autoencoder() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 64)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )


def train_autoencoder(epochs: int, batch: int = 100, **settings) -> list[float]:
    x, _ = digits()
    model = autoencoder()
    opt = curvkit_kfac.KFAC(model.parameters(), model=model, **settings)
    losses = []
    for _ in range(epochs):
        total = 0.0
        for idx in torch.randperm(len(x)).split(batch):
            out = model(x[idx])
            loss = F.binary_cross_entropy_with_logits(out, x[idx], reduction="sum") / len(idx)
            opt.zero_grad()
            opt.update_curvature(out, loss="bce_with_logits")
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(x))
    return losses


def train_cnn(epochs: int, batch: int = 64, **settings) -> list[tuple[float, float]]:
    x, y = digits()
    x = x.reshape(-1, 1, 8, 8)
    model = cnn()
    opt = curvkit_kfac.KFAC(model, **settings)
    history = []
    for _ in range(epochs):
        total, correct = 0.0, 0
        for idx in torch.randperm(len(x)).split(batch):
            out = model(x[idx])
            loss = F.cross_entropy(out, y[idx])
            opt.zero_grad()
            opt.update_curvature(out, loss="cross_entropy")
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            correct += int((out.argmax(1) == y[idx]).sum())
        history.append((total / len(x), correct / len(x)))
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ae-lr", type=float, default=3e-3, help="autoencoder learning rate (paper: 3e-3)")
    parser.add_argument("--cnn-lr", type=float, default=3e-3, help="CNN learning rate")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    ae = train_autoencoder(args.epochs, lr=args.ae_lr)
    ae_time = (time.perf_counter() - start) / args.epochs
    print(f"autoencoder (64-32-16-32-64, batch 100, lr {args.ae_lr:g}), {ae_time:.3f} s/epoch")
    for epoch, loss in enumerate(ae, 1):
        print(f"  epoch {epoch:3d}  train BCE {loss:8.3f}")
    start = time.perf_counter()
    hist = train_cnn(args.epochs, lr=args.cnn_lr)
    cnn_time = (time.perf_counter() - start) / args.epochs
    print(f"CNN (conv8-conv16/s2-fc10, batch 64, lr {args.cnn_lr:g}), {cnn_time:.3f} s/epoch")
    for epoch, (loss, acc) in enumerate(hist, 1):
        print(f"  epoch {epoch:3d}  train CE {loss:.4f}  train acc {acc:.3f}")


if __name__ == "__main__":
    main()
