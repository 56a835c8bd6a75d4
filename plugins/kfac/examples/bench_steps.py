"""Scratch timing of the plugin methods on the MNIST-autoencoder shapes (random data).

    python plugins/kfac/examples/bench_steps.py [--batch 1000 128] [--methods KFAC Shampoo KBFGS KBFGS_L]

ms/step: statistics every step, inverses every 20 steps, mean over 40 steps after 21 warm-up
steps, torch.set_num_threads(2). Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import curvkit

WIDTHS = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]


def autoencoder() -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(WIDTHS) - 2 and b != 30:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def build(name: str, model: nn.Module):
    if name == "KFAC":
        from curvkit_kfac import KFAC
        return KFAC(model, invert_every=20, curvature_every=1)
    if name == "Shampoo":
        from curvkit_shampoo import Shampoo
        return Shampoo(model.parameters(), model=model, invert_every=20, curvature_every=1)
    if name == "KBFGS":
        from curvkit_kbfgs import KBFGS
        return KBFGS(model, invert_every=20, curvature_every=1)
    if name == "KBFGS_L":
        from curvkit_kbfgs import KBFGSL
        return KBFGSL(model, invert_every=20, curvature_every=1)
    raise ValueError(name)


def time_method(name: str, batch: int, warmup: int = 21, steps: int = 40) -> float:
    torch.manual_seed(0)
    model = autoencoder()
    opt = build(name, model)
    x = torch.rand(batch, 784)
    loss_fn = nn.BCEWithLogitsLoss()

    def one() -> None:
        if opt.needs_closure:
            def closure():
                opt.zero_grad()
                loss = loss_fn(model(x), x)
                loss.backward()
                return loss
            opt.step(closure)
            return
        out = model(x)
        opt.zero_grad()
        if opt.evidence.source.value == "sampled":
            opt.update_curvature(out, loss="bce_with_logits")
        loss_fn(out, x).backward()
        opt.step()

    for _ in range(warmup):
        one()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1000, 128])
    ap.add_argument("--methods", nargs="+", default=["KFAC", "Shampoo", "KBFGS", "KBFGS_L"])
    ap.add_argument("--warmup", type=int, default=21)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(2)
    for b in args.batch:
        for m in args.methods:
            ms = time_method(m, b, warmup=args.warmup, steps=args.steps)
            print(f"{m:8s} batch {b:5d}: {ms:8.1f} ms/step", flush=True)


if __name__ == "__main__":
    main()
