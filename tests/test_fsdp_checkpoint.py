"""DCP save/load of the optimizer state of FSDP2 (``fully_shard``) parameters: 2 ranks -> 2 ranks
resumes bit for bit; 2 ranks -> 1 process (no process group) resumes the run on the global batch.

Two optimizers per run: TNT with reproducible "sampled" targets (a sampler callable with fixed
targets, so one process can follow the same run) and TNT with real sampled targets (its sampling
generators travel in the checkpoint).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_distributed_core import launch, main  # noqa: E402
from tests.test_fsdp_methods import data, fixed, make_model, shard  # noqa: E402

HERE = Path(__file__).resolve()
SAVED_AT, MORE = 3, 3


def build(model, *, seed: int = 5):
    import curvkit

    return curvkit.TNT(model.parameters(), model=model, lr=1e-2, invert_every=2, seed=seed)


def step(opt, model, x, y, t, *, real: bool) -> None:
    from torch.nn import functional as F

    out = model(x)
    opt.zero_grad()
    opt.update_curvature(out, loss="cross_entropy" if real else fixed(t))
    F.cross_entropy(out, y).backward()
    opt.step()


def run(models, opts, rank, steps, *, world: int = 2) -> None:
    for s in steps:
        if world == 1:  # one process: the global batch of the two ranks
            xs, ys, ts = zip(*(data(r, s) for r in range(2)))
            x, y, t = torch.cat(xs), torch.cat(ys), torch.cat(ts)
        else:
            x, y, t = data(rank, s)
        for model, opt, real in zip(models, opts, (False, True)):
            step(opt, model, x, y, t, real=real)


def state(model, opt) -> dict:
    from curvkit._tree import tensors_in
    from curvkit.distributed import full_tensors

    return {
        "params": [t.clone() for t in full_tensors([p.detach() for p in model.parameters()])],
        "state": [t.clone() for bi in range(len(opt.blocks)) for t in tensors_in(opt.block_state(bi))
                  if t.is_floating_point()],
        "step": opt.step_count,
    }


def dcp_state(model, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


def dcp_load(model, opt, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    sd = dcp_state(model, opt)
    dcp.load(sd, checkpoint_id=str(path))
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])


def fresh(world: int):
    models = [make_model(), make_model()]
    with torch.no_grad():
        for m in models:
            for p in m.parameters():
                p.fill_(0.5)  # nothing of a fresh model may survive the load
    if world > 1:
        models = [shard(m) for m in models]
    return models, [build(m, seed=99) for m in models]


# ----------------------------------------------------------------------------- scenarios (ranks)
def scenario_save(rank: int, world: int, ckpt: str) -> dict:
    import torch.distributed.checkpoint as dcp

    models = [shard(make_model()), shard(make_model())]
    opts = [build(m) for m in models]
    run(models, opts, rank, range(SAVED_AT))
    for i, (m, o) in enumerate(zip(models, opts)):
        dcp.save(dcp_state(m, o), checkpoint_id=str(Path(ckpt) / f"opt{i}"))
    saved = [state(m, o) for m, o in zip(models, opts)]
    run(models, opts, rank, range(SAVED_AT, SAVED_AT + MORE))
    return {"saved": saved, "after": [state(m, o) for m, o in zip(models, opts)]}


def scenario_resume(rank: int, world: int, ckpt: str) -> dict:
    models, opts = fresh(world)
    for i, (m, o) in enumerate(zip(models, opts)):
        dcp_load(m, o, Path(ckpt) / f"opt{i}")
    loaded = [state(m, o) for m, o in zip(models, opts)]
    run(models[:1] if world == 1 else models, opts[:1] if world == 1 else opts, rank,
        range(SAVED_AT, SAVED_AT + MORE), world=world)
    return {"loaded": loaded, "after": [state(m, o) for m, o in zip(models, opts)]}


SCENARIOS = {"save": scenario_save, "resume": scenario_resume}


# ----------------------------------------------------------------------------- tests
def test_fsdp_checkpoint_resumes_on_two_ranks_and_in_one_process(tmp_path):
    ckpt = tmp_path / "ckpt"
    saved = launch(HERE, "save", 2, tmp_path / "a", str(ckpt))
    two = launch(HERE, "resume", 2, tmp_path / "b", str(ckpt))
    one = launch(HERE, "resume", 1, tmp_path / "c", str(ckpt), "--no-dist")[0]
    for r in range(2):
        for i in range(2):
            want_saved, want_after = saved[r]["saved"][i], saved[r]["after"][i]
            got = two[r]
            assert got["loaded"][i]["step"] == SAVED_AT and got["after"][i]["step"] == SAVED_AT + MORE
            for key in ("params", "state"):
                # the loaded state is the saved one, and the resumed run is the uninterrupted run
                for a, b in zip(got["loaded"][i][key], want_saved[key]):
                    assert torch.equal(a, b), (r, i, key)
                for a, b in zip(got["after"][i][key], want_after[key]):
                    assert torch.equal(a, b), (r, i, key)
    # one process loads the 2-rank checkpoint (every tensor) and continues on the global batch
    for key in ("params", "state"):
        for a, b in zip(one["loaded"][0][key], saved[0]["saved"][0][key]):
            assert torch.equal(a, b), key
        for a, b in zip(one["loaded"][1][key], saved[0]["saved"][1][key]):
            assert torch.equal(a, b), key
        for a, b in zip(one["after"][0][key], saved[0]["after"][0][key]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert one["after"][0]["step"] == SAVED_AT + MORE


if __name__ == "__main__":
    main(SCENARIOS)
