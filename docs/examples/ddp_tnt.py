"""TNT under DistributedDataParallel, with the curvature statistics synchronised across ranks.

Run on CPU with two processes::

    torchrun --nproc_per_node 2 docs/examples/ddp_tnt.py

DDP averages the *gradients* across ranks inside ``loss.backward()``, but curvkit's optimizer is
per-process: ``opt.update_curvature(outputs, loss=...)`` would take the statistics from each
rank's local batch only, the ranks would then invert different factors, and their replicas would
drift apart. :func:`synced_update_curvature` keeps them identical: it computes the sampled-target
gradient itself, averages it over ranks (so every rank sees the sampled gradient of the global
batch, exactly what one process with the whole batch would use), and feeds it through the
low-level ``update_curvature(grads=...)``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

import curvkit
from curvkit.fisher import sampled_loss


def synced_update_curvature(
    opt: curvkit.CurvatureOptimizer, outputs: Tensor, loss: str, generator: torch.Generator
) -> bool:
    """``opt.update_curvature(outputs, loss=loss)``, with the sampled gradient averaged over ranks.

    Call it where ``update_curvature`` goes: after the forward pass, before ``loss.backward()``.
    ``generator`` draws the sampled targets; give each rank its own seed.
    """
    if not opt.statistics_due():
        return False  # nothing sampled, nothing retained
    params = [p for group in opt.param_groups for p in group["params"]]
    value = sampled_loss(outputs, loss, generator=generator)
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    averaged: list[Tensor | None] = []
    for g in grads:
        if g is not None:
            g = g.contiguous()
            dist.all_reduce(g)  # sum over ranks (one all-reduce per parameter, for clarity)
            g /= dist.get_world_size()
        averaged.append(g)
    return opt.update_curvature(grads=averaged)


#: How the statistics are taken: ``"local"`` (plain ``update_curvature``: each rank's own batch),
#: ``"synced"`` (:func:`synced_update_curvature`), ``"minibatch"`` (TNT's empirical ablation, whose
#: statistics are read from ``p.grad`` after DDP has averaged it).
MODES = ("local", "synced", "minibatch")


def train(rank: int, *, steps: int, mode: str) -> Tensor:
    """A few TNT steps on rank-local random batches; returns the flattened parameters."""
    torch.manual_seed(0)  # the same initial model on every rank
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    ddp = DistributedDataParallel(model)
    evidence = "empirical" if mode == "minibatch" else "sampled"
    opt = curvkit.TNT(model.parameters(), lr=1e-2, damping=0.1, evidence=evidence, seed=1000 + rank)
    sampler = torch.Generator().manual_seed(2000 + rank)  # each rank samples its own targets
    data = torch.Generator().manual_seed(3000 + rank)     # each rank sees its own batches
    for _ in range(steps):
        x = torch.randn(16, 6, generator=data)
        y = torch.randint(0, 3, (16,), generator=data)
        out = ddp(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        if mode == "synced":
            synced_update_curvature(opt, out, "cross_entropy", sampler)
        else:  # rank-local statistics; a no-op for minibatch evidence (read in step)
            opt.update_curvature(out, loss="cross_entropy")
        loss.backward()  # DDP averages the gradients here
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def replica_spread(params: Tensor) -> float:
    """The largest difference between this rank's parameters and any other rank's."""
    gathered = [torch.empty_like(params) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, params)
    return max(float((other - params).abs().max()) for other in gathered)


def main() -> None:
    dist.init_process_group("gloo")
    for mode in MODES:
        spread = replica_spread(train(dist.get_rank(), steps=5, mode=mode))
        if dist.get_rank() == 0:
            print(f"statistics {mode:9s}  largest difference between replicas: {spread:.3g}")
    dist.destroy_process_group()


if __name__ == "__main__" and "RANK" in os.environ:
    main()
