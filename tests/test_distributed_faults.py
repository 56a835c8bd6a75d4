"""Faults on one rank of two (gloo, 127.0.0.1, bounded in time): skip decisions are collective,
replicas stay identical, and a rank that misses update_curvature neither aborts nor hangs the
others."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_distributed_core import launch, main  # noqa: E402

HERE = Path(__file__).resolve()


def run(rank: int, *, skip_at=None, nan_at=None, **options) -> dict:
    import warnings

    import curvkit
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    ddp = DDP(model)
    opt = curvkit.TNT(model, lr=1e-2, invert_every=2, seed=10 + rank, **options)
    error = ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for step in range(5):
                g = torch.Generator().manual_seed(100 * rank + step)
                x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
                if nan_at == step and rank == 1:
                    x[0, 0] = float("nan")
                out = ddp(x)
                loss = nn.functional.cross_entropy(out, y)
                opt.zero_grad()
                if not (skip_at == step and rank == 1):
                    opt.update_curvature(out, loss="cross_entropy")
                loss.backward()
                opt.step()
        except (RuntimeError, FloatingPointError) as exc:
            error = f"{type(exc).__name__}: {exc}"
    params = [p.detach().clone() for p in model.parameters()]
    return {
        "error": error,
        "params": params,
        "finite": all(bool(torch.isfinite(p).all()) for p in params),
        "warnings": [str(w.message) for w in caught],
        "has_inverses": [opt.block_state(b)["inverses"] is not None for b in opt.blocks],
        "health": opt.health(),
    }


def scenario_skip(rank, world):
    return run(rank, skip_at=2)


def scenario_nan_first(rank, world):
    return run(rank, nan_at=0)


def scenario_raise(rank, world):
    return run(rank, nan_at=2, nonfinite="raise")


def scenario_strict(rank, world):
    return run(rank, skip_at=2, strict=True)


def scenario_fallback(rank, world):
    """Every float32 inversion fails (a stand-in for eigh not converging): each factor's owner
    retries it in float64 and counts it."""
    import curvkit
    from curvkit.inverters.eigen import DampedEigen
    from torch.nn.parallel import DistributedDataParallel as DDP

    class Float32Fails(DampedEigen):
        def invert(self, matrices, *, damping, order):
            if matrices.dtype == torch.float32:
                raise torch.linalg.LinAlgError("float32 inversion failed (test)")
            return super().invert(matrices, damping=damping, order=order)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    ddp = DDP(model)
    opt = curvkit.compose(model, estimator="tensor_normal", preconditioner="kronecker_mode",
                          inverter=Float32Fails(power=1.0), lr=1e-2, invert_every=2, seed=rank)
    owned = 0
    for step in range(3):
        g = torch.Generator().manual_seed(100 * rank + step)
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        out = ddp(x)
        opt.zero_grad()
        opt.update_curvature(out, loss="cross_entropy")
        nn.functional.cross_entropy(out, y).backward()
        opt.step()
    owners = getattr(opt, "_owners", {})
    return {"health": opt.health(), "owned": sum(1 for o in owners.values() if o == rank)}


SCENARIOS = {"skip": scenario_skip, "nan_first": scenario_nan_first, "raise": scenario_raise, "strict": scenario_strict,
             "fallback": scenario_fallback}


def same(results):
    return all(torch.equal(p, q) for p, q in zip(results[0]["params"], results[1]["params"]))


def test_a_rank_that_skips_update_curvature_neither_aborts_nor_desynchronises(tmp_path):
    results = launch(HERE, "skip", 2, tmp_path, timeout=120)
    assert all(r["error"] == "" for r in results) and same(results)
    assert any("did not call update_curvature" in w for w in results[1]["warnings"])


def test_non_finite_evidence_on_one_rank_at_the_first_statistics_step_is_skipped_everywhere(tmp_path):
    results = launch(HERE, "nan_first", 2, tmp_path, timeout=120)
    assert all(r["error"] == "" and r["finite"] for r in results) and same(results)
    assert results[0]["has_inverses"] == results[1]["has_inverses"]
    for r in results:
        assert sum(h["skipped_nonfinite_evidence"] for h in r["health"].values()) > 0


def test_nonfinite_raise_on_one_rank_raises_on_every_rank(tmp_path):
    results = launch(HERE, "raise", 2, tmp_path, timeout=120)
    assert all(r["error"].startswith("FloatingPointError") for r in results)


def test_strict_missing_evidence_raises_on_every_rank(tmp_path):
    results = launch(HERE, "strict", 2, tmp_path, timeout=120)
    assert all("did not call update_curvature" in r["error"] for r in results)


def test_inversion_fallbacks_are_counted_on_every_rank(tmp_path):
    """Under divided inverses only a factor's owner inverts it; the fallback counts are shared so
    that health() agrees on every rank (before, each rank saw only its own factors')."""
    results = launch(HERE, "fallback", 2, tmp_path, timeout=120)
    counts = [{k: h["inverse_retry_float64"] for k, h in r["health"].items()} for r in results]
    assert counts[0] == counts[1]
    assert sum(counts[0].values()) > 0


if __name__ == "__main__":
    main(SCENARIOS)
