"""Optimizer state through torch.distributed.checkpoint (DCP): get/set_optimizer_state_dict and
dcp.save/load, in one process and from 2 gloo ranks (DDP) into 1 process, continuing exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_distributed_core import launch, main  # noqa: E402

HERE = Path(__file__).resolve()


def make():
    import curvkit

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    return model, curvkit.TNT(model, lr=1e-2, invert_every=3, seed=11)


def batch(step: int, rank: int = 0):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def train(model, opt, steps, start=0, rank=0, forward=None):
    forward = forward or model
    for t in range(start, start + steps):
        x, y = batch(t, rank)
        out = forward(x)
        loss = nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        opt.update_curvature(out, loss="cross_entropy")
        loss.backward()
        opt.step()


def save_dcp(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(path))


def load_dcp(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=str(path))
    set_optimizer_state_dict(model, opt, state["optim"])


def test_dcp_round_trip_in_one_process_continues_exactly(tmp_path):
    model, opt = make()
    train(model, opt, 4)
    save_dcp(model, opt, tmp_path / "ckpt")
    train(model, opt, 4, start=4)
    fresh_model, fresh = make()
    fresh_model.load_state_dict({k: v for k, v in model.state_dict().items()})  # replaced below
    ref_model, ref = make()
    train(ref_model, ref, 4)
    fresh_model.load_state_dict(ref_model.state_dict())
    assert fresh.step_count == 0
    load_dcp(fresh_model, fresh, tmp_path / "ckpt")
    assert fresh.step_count == 4  # no phantom step from DCP's state initialisation
    train(fresh_model, fresh, 4, start=4)
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(p, q)


def scenario_save(rank: int, world: int, outdir: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, opt = make()
    ddp = DDP(model)
    train(model, opt, 4, rank=rank, forward=ddp)
    save_dcp(model, opt, Path(outdir) / "ckpt")
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, opt, 3, start=4, rank=rank, forward=ddp)
    return {"model": snapshot, "after": [p.detach().clone() for p in model.parameters()]}


SCENARIOS = {"save": scenario_save}


def test_two_rank_checkpoint_loads_in_one_process(tmp_path):
    results = launch(HERE, "save", 2, tmp_path, str(tmp_path))
    for p, q in zip(results[0]["after"], results[1]["after"]):
        assert torch.equal(p, q)
    model, opt = make()
    model.load_state_dict(results[0]["model"])
    load_dcp(model, opt, tmp_path / "ckpt")
    assert opt.step_count == 4
    # one process continuing on rank 0's data has the statistics of both ranks' batches
    st = opt.block_state(0)["estimator"]
    assert all(bool(torch.isfinite(g).all()) for g in st["grams"])
    train(model, opt, 1, start=4)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


if __name__ == "__main__":
    main(SCENARIOS)
