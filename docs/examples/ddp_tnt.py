"""TNT under DistributedDataParallel: the replicas see the global batch's curvature by default.

Run on CPU with two processes::

    torchrun --nproc_per_node 2 docs/examples/ddp_tnt.py

DDP averages the *gradients* across ranks inside ``loss.backward()``, but the sampled-target
backward of ``opt.update_curvature(outputs, loss=...)`` goes through :func:`torch.autograd.grad`,
which DDP does not intercept. Under an initialised process group the optimizer therefore averages
the sampled gradient over the ranks itself (one all-reduce per statistics step) before forming
the statistics, so every rank holds the statistics of the global batch and the replicas stay
identical. ``distributed=False`` turns that off: each rank's statistics then come from its own
batch, the ranks invert different factors and their replicas drift apart.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

import curvkit


#: How the statistics are taken: ``"local"`` (``distributed=False``: each rank's own batch),
#: ``"default"`` (the sampled gradient averaged over the ranks), ``"minibatch"`` (TNT's empirical
#: ablation, whose statistics are read from ``p.grad`` after DDP has averaged it).
MODES = ("local", "default", "minibatch")


def train(rank: int, *, steps: int, mode: str) -> Tensor:
    """A few TNT steps on rank-local random batches; returns the flattened parameters."""
    torch.manual_seed(0)  # the same initial model on every rank
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    ddp = DistributedDataParallel(model)
    evidence = "empirical" if mode == "minibatch" else "sampled"
    opt = curvkit.TNT(model.parameters(), lr=1e-2, damping=0.1, evidence=evidence,
                      seed=1000 + rank,  # each rank samples its own targets
                      distributed=False if mode == "local" else None)
    data = torch.Generator().manual_seed(3000 + rank)     # each rank sees its own batches
    for _ in range(steps):
        x = torch.randn(16, 6, generator=data)
        y = torch.randint(0, 3, (16,), generator=data)
        out = ddp(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        opt.update_curvature(out, loss="cross_entropy")  # a no-op for minibatch evidence
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
