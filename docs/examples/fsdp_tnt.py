"""TNT with FSDP2 (``fully_shard``): the same training loop as one process on the global batch.

Run on CPU with two processes::

    torchrun --standalone --nproc_per_node 2 docs/examples/fsdp_tnt.py

Every ``Linear`` and then the model are wrapped by ``torch.distributed.fsdp.fully_shard``, so
parameters and gradients are DTensors sharded on dim 0. The optimizer detects this at
construction and works on full tensors where a block needs the whole parameter: it gathers the
(rank-averaged) gradients once per step, takes TNT's sampled gradient by a second backward into
``.grad`` (FSDP2 averages it over the ranks), keeps statistics, inverses and momentum as plain
tensors identical on every rank, divides the inversions between the ranks, and writes each
rank's rows of the update into its shard. Rank 0 then replays the run in one process on the
global batch (both ranks' examples, each rank's fixed "sampled" targets) and prints the largest
difference, and the run is saved and restored with ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn import functional as F

import curvkit
from curvkit.distributed import full_tensors


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial model on every rank
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def batch(rank: int, step: int) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's inputs, labels and fixed 'sampled' targets at ``step``."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return (torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g),
            torch.randint(0, 3, (8,), generator=g))


def fixed(targets: Tensor):
    """A sampler callable with fixed targets: reproducible 'sampled' evidence for the comparison.
    In real training pass ``loss="cross_entropy"`` (targets drawn from the model)."""
    return lambda outputs, generator: F.cross_entropy(outputs, targets)


def train_step(model: nn.Module, opt: curvkit.CurvatureOptimizer, x: Tensor, y: Tensor, t: Tensor) -> None:
    out = model(x)
    opt.zero_grad()
    opt.update_curvature(out, loss=fixed(t))  # the sampled backward, averaged over the ranks
    F.cross_entropy(out, y).backward()        # FSDP2 reduce-scatters the gradients here
    opt.step()                                # each rank writes its rows of the update


def train(rank: int, world: int, steps: range, model: nn.Module, opt: curvkit.CurvatureOptimizer) -> None:
    for step in steps:
        if world == 1:  # one process: the global batch of the two ranks
            x, y, t = (torch.cat(parts) for parts in zip(*(batch(r, step) for r in range(2))))
        else:
            x, y, t = batch(rank, step)
        train_step(model, opt, x, y, t)


def sharded() -> tuple[nn.Module, curvkit.CurvatureOptimizer]:
    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, curvkit.TNT(model.parameters(), model=model, lr=1e-2, invert_every=2)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, opt = sharded()
    train(rank, world, range(3), model, opt)
    path = os.path.join(tempfile.gettempdir(), f"curvkit-fsdp-example-{os.environ.get('MASTER_PORT', '0')}")
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    train(rank, world, range(3, 6), model, opt)
    final = torch.cat([p.reshape(-1) for p in full_tensors([p.detach() for p in model.parameters()])])

    resumed, ropt = sharded()  # a fresh run restored from the checkpoint
    sd = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, ropt)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(resumed, sd["model"])
    set_optimizer_state_dict(resumed, ropt, sd["optim"])
    train(rank, world, range(3, 6), resumed, ropt)
    again = torch.cat([p.reshape(-1) for p in full_tensors([p.detach() for p in resumed.parameters()])])
    if rank == 0:
        reference = make_model()
        ref_opt = curvkit.TNT(reference.parameters(), model=reference, lr=1e-2, invert_every=2, distributed=False)
        train(0, 1, range(6), reference, ref_opt)
        single = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
        print(f"FSDP2 on {world} ranks vs one process on the global batch: {float((final - single).abs().max()):.3g}")
        print(f"resumed from the checkpoint vs uninterrupted: {float((again - final).abs().max()):.3g}")
    dist.barrier()
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__" and "RANK" in os.environ:
    main()
