"""The optimizer under torch.distributed (gloo, 127.0.0.1, 2 CPU processes, bounded in time):
replicas identical by default under DDP, the global batch's curvature, divided inverse work."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_distributed_core import launch, main  # noqa: E402

HERE = Path(__file__).resolve()
METHODS = ["TNT", "TNT-empirical", "KFAC", "Shampoo"]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def build(name, model, **kw):
    import curvkit

    if name == "TNT":
        return curvkit.TNT(model.parameters(), model=model, lr=1e-2, invert_every=3, **kw)
    if name == "TNT-empirical":
        return curvkit.TNT(model.parameters(), model=model, lr=1e-2, invert_every=3, evidence="empirical", **kw)
    return curvkit.get("method", name)(model.parameters(), model=model, lr=1e-2, invert_every=3, **kw)


def data(rank: int, n: int = 8):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def scenario_ddp(rank: int, world: int, name: str) -> dict:
    import curvkit
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    ddp = DDP(model)
    opt = build(name, model)
    inverted = {"rows": 0}
    real = opt.inverter.invert

    def counting(matrices, **kw):
        inverted["rows"] += matrices.shape[0]
        return real(matrices, **kw)

    opt.inverter.invert = counting
    for step in range(7):
        x, y = data(rank * 10 + step)
        out = ddp(x)
        loss = nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        opt.update_curvature(out, loss="cross_entropy")
        loss.backward()
        opt.step()
    return {"params": [p.detach().clone() for p in model.parameters()], "inverted": inverted["rows"],
            "health": opt.health(), "divided": opt.divide_inverses}


SCENARIOS = {"ddp": scenario_ddp}


@pytest.mark.parametrize("name", METHODS)
def test_ddp_replicas_stay_identical_by_default_and_divide_the_inverse_work(name, tmp_path):
    results = launch(HERE, "ddp", 2, tmp_path, name)
    for p, q in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(p, q), name
    assert results[0]["divided"]
    rows = [r["inverted"] for r in results]
    # every factor is inverted by exactly one rank, so each does about half the work
    assert 0 < min(rows) and max(rows) < sum(rows)


def test_global_batch_equivalence_for_minibatch_evidence(tmp_path):
    """TNT-empirical under DDP on 2 ranks equals one process on the global batch."""
    import curvkit  # noqa: F401

    results = launch(HERE, "ddp", 2, tmp_path, "TNT-empirical")
    model = make_model()
    opt = build("TNT-empirical", model)
    for step in range(7):
        xs, ys = zip(*(data(r * 10 + step) for r in range(2)))
        x, y = torch.cat(xs), torch.cat(ys)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p, q in zip(model.parameters(), results[0]["params"]):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)


def test_non_linear_statistics_are_refused_under_a_process_group(tmp_path):
    results = launch(HERE, "kbfgs", 2, tmp_path)
    assert all("not linear" in r["error"] for r in results)


def scenario_kbfgs(rank: int, world: int) -> dict:
    import curvkit

    model = make_model()
    try:
        curvkit.get("method", "KBFGS")(model, lr=0.1)
    except ValueError as exc:
        return {"error": str(exc)}
    return {"error": ""}


SCENARIOS["kbfgs"] = scenario_kbfgs

if __name__ == "__main__":
    main(SCENARIOS)
