"""K-BFGS and K-BFGS(L) on scikit-learn's bundled digits: a 64-32-16-32-64 autoencoder.

Run ``python plugins/kbfgs/examples/digits_autoencoder.py [--epochs N] [--methods KBFGS,KBFGS_L,Adam]``;
it prints the full-data training loss per epoch (BCE-with-logits summed over the 64 pixels,
mean over examples; batches of 256, the presets' defaults: the paper's MNIST settings), the
wall time, and per layer the accepted/skipped quasi-Newton pairs and the relative Frobenius
distance of the tracked :math:`H_a` from :math:`(A + \\sqrt\\lambda I)^{-1}`.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

import curvkit


def bce(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(out, x, reduction="sum") / x.shape[0]


def train(method: str, data: torch.Tensor, epochs: int, batch_size: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.Linear(16, 32), nn.ReLU(),
                          nn.Linear(32, 64))
    if method == "Adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        opt = curvkit.get("method", method)(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        print(f"{method}: initial loss {float(bce(model(data), data)):.3f}")
    start = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(len(data), generator=gen)
        for i in range(0, len(data) - batch_size + 1, batch_size):
            x = data[perm[i:i + batch_size]]

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = bce(model(x), x)
                loss.backward()
                return loss

            if getattr(opt, "needs_closure", False):
                opt.step(closure)
            else:
                closure()
                opt.step()
        with torch.no_grad():
            print(f"  epoch {epoch + 1}: loss {float(bce(model(data), data)):.3f}")
    print(f"  {time.perf_counter() - start:.2f} s")
    if isinstance(opt, curvkit.CurvatureOptimizer):
        for block in opt.blocks:
            st = opt.block_state(block)["estimator"]
            ref = torch.linalg.inv(st["A"].double() + math.sqrt(st["damping"]) * torch.eye(len(st["A"]),
                                                                                           dtype=torch.float64))
            err = float(torch.linalg.norm(st["Ha"].double() - ref) / torch.linalg.norm(ref))
            print(f"  layer {block.name}: {st['counts']}, H_a relative error {err:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--methods", default="KBFGS,KBFGS_L,Adam")
    args = parser.parse_args()
    data = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    for method in args.methods.split(","):
        train(method, data, args.epochs, args.batch_size)


if __name__ == "__main__":
    main()
