"""curvkit.distributed on real process groups: gloo on 127.0.0.1, 2 and 4 CPU processes.

Each launch runs one scenario of this file (``python tests/test_distributed_core.py SCENARIO
RANK WORLD PORT OUTDIR``) in every rank; the ranks save what they saw with :func:`torch.save`
and the tests compare it with references computed here in float64 from the same seeded inputs
(no collective involved), and across ranks bit for bit.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
LAUNCH_TIMEOUT = 120.0


# ----------------------------------------------------------------------------- launcher
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, scenario: str, world: int, outdir: Path, *extra: str, timeout: float = LAUNCH_TIMEOUT) -> list[dict]:
    """Run ``scenario`` of ``script`` on ``world`` gloo ranks; return each rank's saved result.

    One subprocess imports torch once and forks the ranks (``python script scenario world port
    outdir *extra``, see :func:`main`); it is killed on timeout, and a failure shows its output."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    paths = [str(ROOT / "src"), str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    outdir.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            [sys.executable, str(script), scenario, str(world), str(port), str(outdir), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"scenario {scenario} on {world} ranks did not finish within {timeout} s:\n{exc.output}")
    if done.returncode != 0:
        pytest.fail(f"scenario {scenario} on {world} ranks failed (exit {done.returncode}):\n{done.stdout}")
    return [torch.load(outdir / f"{scenario}-{r}.pt", weights_only=False) for r in range(world)]


def main(scenarios: dict) -> None:
    """Entry point of a launched script: fork ``world`` ranks that each run the scenario, join
    them (a rank that fails or hangs fails the run; survivors are killed on the way out)."""
    import multiprocessing as mp

    scenario, world, port, outdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    extra = sys.argv[5:]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_rank_main, args=(scenarios[scenario], scenario, r, world, port, outdir, extra))
             for r in range(world)]
    for p in procs:
        p.start()
    code = 0
    for p in procs:
        p.join()
        code = code or p.exitcode
        if p.exitcode:
            for q in procs:
                if q.is_alive():
                    q.kill()
    sys.exit(1 if code else 0)


def _rank_main(fn, scenario: str, rank: int, world: int, port: int, outdir: Path, extra: list[str]) -> None:
    if "--no-dist" not in extra:
        init(rank, world, port)
    result = fn(rank, world, *[e for e in extra if e != "--no-dist"])
    torch.save(result, outdir / f"{scenario}-{rank}.pt")
    if "--no-dist" not in extra:
        import gc

        import torch.distributed as dist

        # a DDP model the scenario built (in a reference cycle, say) must go while the group is
        # registered: as the group's last owner its reducer would join gloo's worker thread with
        # the GIL held, and a worker still releasing a collective's tensors waits for the GIL
        gc.collect()
        dist.destroy_process_group()


def init(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


# ----------------------------------------------------------------------------- shared inputs
AVG_SPECS = [((3, 4), torch.float32), ((5,), torch.float64), ((2,), torch.float32), ((2, 2), torch.float64)]
# MNIST-autoencoder-like factor sizes (scaled down) plus a float64 bucket.
SHARE_SPECS = [(40, torch.float32), (31, torch.float32), (25, torch.float32), (12, torch.float32),
               (3, torch.float32), (7, torch.float64), (1, torch.float32), (18, torch.float64)]


def avg_input(i: int, rank: int) -> torch.Tensor:
    shape, dtype = AVG_SPECS[i]
    g = torch.Generator().manual_seed(1000 * i + rank)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) * (rank + 1)


def owned_value(i: int) -> torch.Tensor:
    d, dtype = SHARE_SPECS[i]
    g = torch.Generator().manual_seed(7 + i)
    return torch.randn(d, d, generator=g, dtype=torch.float64).to(dtype)


# ----------------------------------------------------------------------------- scenarios (ranks)
def scenario_core(rank: int, world: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from curvkit.distributed import TorchDistributed, full_tensor, inverse_cost, is_dtensor, local_like, make_distributor

    counts: dict[str, int] = {}
    for name in ("all_reduce", "all_gather_single", "all_gather_into_tensor", "broadcast", "all_gather"):
        real = getattr(dist, name)

        def counted(*a, _real=real, _name=name, **k):
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*a, **k)

        setattr(dist, name, counted)

    def collectives(fn) -> dict[str, int]:
        counts.clear()
        fn()
        return dict(counts)

    res: dict = {}
    dd = make_distributor()
    res["kind"], res["rank"], res["world"] = type(dd).__name__, dd.rank, dd.world_size
    tensors = [avg_input(i, rank) for i in range(len(AVG_SPECS))]
    res["average_calls"] = collectives(lambda: dd.average_(tensors))
    res["average"] = [t.clone() for t in tensors]

    costs = [inverse_cost(d) for d, _ in SHARE_SPECS]
    owners = dd.assign(costs)
    res["owners"] = owners
    for method in ("all_gather", "all_reduce"):
        d2 = TorchDistributed(share=method)
        shared = [
            owned_value(i) if owners[i] == rank else torch.full((d, d), float("nan"), dtype=dt)
            for i, (d, dt) in enumerate(SHARE_SPECS)
        ]
        res[f"share_calls_{method}"] = collectives(lambda: d2.share_(shared, owners))
        res[f"share_{method}"] = shared

    flags = torch.tensor([True, rank != 1, True, rank == 0, False])
    res["all"] = dd.all_(flags)
    res["flags_after"] = flags.clone()
    res["sum"] = dd.sum_(torch.tensor([rank, 1, 2 * rank + 1], dtype=torch.int64))
    res["sum_float"] = dd.sum_(torch.tensor([0.5 * rank, 1.0]))

    # DTensor helpers
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(3)
    full = torch.randn(7, 5, generator=g)
    helpers = {}
    for label, placements in (("shard0", [Shard(0)]), ("shard1", [Shard(1)]), ("replicate", [Replicate()])):
        dt = distribute_tensor(full, mesh, placements)
        back = full_tensor(dt)
        again = local_like(back, dt)
        helpers[label] = {
            "is_dtensor": (is_dtensor(dt), is_dtensor(back), is_dtensor(again)),
            "full_equal": torch.equal(back, full),
            "local_equal": torch.equal(again.to_local(), dt.to_local()),
            "placements_equal": tuple(again.placements) == tuple(dt.placements),
            "local_shape": tuple(dt.to_local().shape),
        }
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 7)
    fully_shard(lin)
    helpers["fsdp"] = {
        n: torch.equal(local_like(full_tensor(p.detach()), p).to_local(), p.detach().to_local())
        for n, p in lin.named_parameters()
    }
    helpers["plain_passthrough"] = local_like(full, full) is full and full_tensor(full) is full
    # full_tensors: FSDP2 gradients, parameters, a Replicate DTensor and a plain tensor, with one
    # all_gather for the whole Shard(0) bucket (uneven rows: 7 and 3 over the ranks, 1 row too)
    from curvkit.distributed import full_tensors

    torch.manual_seed(1)
    mlp = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3), torch.nn.Linear(3, 1))
    for m in mlp:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m)
    fully_shard(mlp)
    mlp(torch.randn(4, 5, generator=torch.Generator().manual_seed(rank))).square().sum().backward()
    mixed = [p.grad for p in mlp.parameters()] + [p.detach() for p in mlp.parameters()]
    mixed += [distribute_tensor(full, mesh, [Replicate()]), full]
    singles = [full_tensor(t) for t in mixed]
    got = []
    helpers["full_tensors_calls"] = collectives(lambda: got.extend(full_tensors(mixed)))
    helpers["full_tensors_equal"] = [torch.equal(a, b) for a, b in zip(got, singles)]
    helpers["full_tensors_plain"] = [not is_dtensor(t) for t in got]
    res["helpers"] = helpers
    return res


def scenario_participation(rank: int, world: int) -> dict:
    from curvkit.distributed import CollectiveMismatchError, TorchDistributed

    res: dict = {}
    dd = TorchDistributed(check=True, check_timeout=20.0)
    x = torch.full((3,), float(rank))
    for step in (1, 2):  # matching calls pass
        dd.average_([x], call="update_curvature", step=step)
        dd.all_(torch.tensor([True]), call="step", step=step)
    res["before"] = x.clone()
    try:
        if rank != 1:
            dd.average_([x], call="update_curvature", step=3)
        dd.all_(torch.tensor([True]), call="step", step=3)
        res["mismatch"] = None
    except CollectiveMismatchError as exc:
        res["mismatch"] = str(exc)
    # a rank that stops calling: the others get the error after check_timeout
    quick = TorchDistributed(check=True, check_timeout=2.0)
    t0 = time.monotonic()
    try:
        if rank != world - 1:
            quick.sum_(torch.ones(1), call="update_curvature", step=9)
        else:
            time.sleep(3.0)
        res["timeout"] = None
    except CollectiveMismatchError as exc:
        res["timeout"] = str(exc)
    res["timeout_s"] = time.monotonic() - t0
    return res


SCENARIOS = {"core": scenario_core, "participation": scenario_participation}


# ----------------------------------------------------------------------------- tests (pytest)
@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def core(request, tmp_path_factory):
    world = request.param
    return world, launch(HERE, "core", world, tmp_path_factory.mktemp(f"core{world}"))


def test_make_distributor_picks_torch(core):
    world, res = core
    assert [(r["kind"], r["rank"], r["world"]) for r in res] == [("TorchDistributed", r, world) for r in range(world)]


def test_average_is_the_mean_and_bit_identical(core):
    world, res = core
    for i, (shape, dtype) in enumerate(AVG_SPECS):
        ref = sum(avg_input(i, r).double() for r in range(world)) / world
        tol = 1e-6 if dtype == torch.float32 else 1e-13
        for r in range(world):
            got = res[r]["average"][i]
            assert got.dtype == dtype and got.shape == shape
            torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
            assert torch.equal(got, res[0]["average"][i]), f"rank {r} differs from rank 0 on tensor {i}"
    # one all_reduce per (dtype, device) bucket: float32 and float64
    assert all(r["average_calls"] == {"all_reduce": 2} for r in res)


def test_assign_balances_inverse_costs(core):
    world, res = core
    owners = res[0]["owners"]
    assert all(r["owners"] == owners for r in res)
    assert set(owners) <= set(range(world))
    costs = [float(d) ** 3 for d, _ in SHARE_SPECS]
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(world)]
    ideal = max(sum(costs) / world, max(costs))
    assert max(loads) <= (4 / 3) * ideal


@pytest.mark.parametrize("method", ["all_gather", "all_reduce"])
def test_share_gives_every_rank_the_owners_values(core, method):
    world, res = core
    owners = res[0]["owners"]
    for i in range(len(SHARE_SPECS)):
        want = owned_value(i)
        for r in range(world):
            got = res[r][f"share_{method}"][i]
            assert torch.equal(got, want), f"{method}: rank {r} tensor {i} (owner {owners[i]})"
    # one collective per (dtype, device) bucket
    name = "all_gather_single" if method == "all_gather" else "all_reduce"
    assert all(r[f"share_calls_{method}"] == {name: 2} for r in res)


def test_all_and_sum(core):
    world, res = core
    want = torch.tensor([True, False, True, world == 1, False])
    for r in range(world):
        assert res[r]["all"].dtype == torch.bool and torch.equal(res[r]["all"], want)
        assert torch.equal(res[r]["sum"], torch.tensor([world * (world - 1) // 2, world, world * world]))
        torch.testing.assert_close(res[r]["sum_float"], torch.tensor([0.25 * world * (world - 1), float(world)]))
    # all_ does not modify its input
    assert torch.equal(res[1]["flags_after"], torch.tensor([True, False, True, False, False]))


def test_dtensor_helpers_round_trip(core):
    world, res = core
    for r in range(world):
        h = res[r]["helpers"]
        for label in ("shard0", "shard1", "replicate"):
            assert h[label]["is_dtensor"] == (True, False, True), label
            assert h[label]["full_equal"] and h[label]["local_equal"] and h[label]["placements_equal"], label
        assert all(h["fsdp"].values()), h["fsdp"]
        assert all(h["full_tensors_equal"]) and all(h["full_tensors_plain"]), h["full_tensors_equal"]
        assert h["full_tensors_calls"] == {"all_gather_single": 1}, h["full_tensors_calls"]
        assert h["plain_passthrough"]
    # uneven shards: 7 rows over 2 ranks are 4 + 3
    if world == 2:
        assert [res[r]["helpers"]["shard0"]["local_shape"] for r in range(2)] == [(4, 5), (3, 5)]


def test_participation_check_names_the_skipped_call(tmp_path):
    world = 2
    res = launch(HERE, "participation", world, tmp_path)
    for r in range(world):
        torch.testing.assert_close(res[r]["before"], torch.full((3,), (world - 1) / 2))
        msg = res[r]["mismatch"]
        assert msg is not None, f"rank {r} did not raise"
        assert "rank 1 did not call update_curvature at step 3" in msg, msg
        assert "its collective call #5 was step at step 3" in msg, msg
        others = [q for q in range(world) if q != 1]
        assert f"Ranks {others} called update_curvature at step 3" in msg, msg
    for r in range(world - 1):
        msg = res[r]["timeout"]
        assert msg is not None and "not every rank reached collective call #1 (update_curvature at step 9)" in msg, msg
        assert res[r]["timeout_s"] < 15
    assert res[world - 1]["timeout"] is None


def test_mismatch_message_blames_the_minority():
    from curvkit.distributed import _mismatch_message

    # 4 ranks, rank 2 skipped update_curvature at step 3 and is at step's call instead
    seen = [(5, 3, "update_curvature")] * 2 + [(5, 3, "step")] + [(5, 3, "update_curvature")]
    msg = _mismatch_message(seen)
    assert "rank 2 did not call update_curvature at step 3 (its collective call #5 was step at step 3)" in msg
    assert "Ranks [0, 1, 3] called update_curvature at step 3" in msg
    assert "rank 0 did not" not in msg and "rank 1 did not" not in msg
    # a tie: the ranks at the later step ran ahead, so they are the ones that skipped
    msg = _mismatch_message([(7, 4, "step"), (7, 3, "step")])
    assert "rank 0 did not call step at step 3 (its collective call #7 was step at step 4)" in msg


# ----------------------------------------------------------------------------- validation (1 process)
def test_single_process_and_validation():
    from curvkit.distributed import (
        SingleProcess, TorchDistributed, assign_lpt, inverse_cost, make_distributor,
    )

    dd = make_distributor()
    assert isinstance(dd, SingleProcess) and (dd.rank, dd.world_size) == (0, 1)
    t = torch.randn(3)
    before = t.clone()
    dd.average_([t])
    dd.share_([t], [0])
    assert torch.equal(t, before)
    assert torch.equal(dd.all_(torch.tensor([True, False])), torch.tensor([True, False]))
    assert dd.assign([5.0, 1.0]) == [0, 0]
    with pytest.raises(ValueError, match=r"owners\[0\] must be a rank in range\(1\)"):
        dd.share_([t], [1])
    with pytest.raises(ValueError, match="owners must hold one rank per tensor"):
        dd.share_([t, t], [0])
    with pytest.raises(ValueError, match=r"tensors\[0\] must be a floating-point tensor"):
        dd.average_([torch.ones(2, dtype=torch.int64)])
    with pytest.raises(ValueError, match="flags must be a bool tensor"):
        dd.all_(torch.ones(2))
    with pytest.raises(ValueError, match="counts must be an integer or floating tensor"):
        dd.sum_(torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"costs\[1\] must be a finite number >= 0"):
        assign_lpt([1.0, float("nan")], 2)
    with pytest.raises(ValueError, match="world_size must be an integer >= 1"):
        assign_lpt([1.0], 0)
    with pytest.raises(ValueError, match="size must be an integer >= 0"):
        inverse_cost(-1)
    with pytest.raises(ValueError, match="share must be one of"):
        make_distributor(share="broadcast")
    with pytest.raises(ValueError, match="process_group was given"):
        make_distributor(process_group=object())
    with pytest.raises(RuntimeError, match="init_process_group"):
        TorchDistributed()


def test_assign_lpt_is_lpt():
    from curvkit.distributed import assign_lpt

    # the textbook LPT order: largest first, each to the least loaded rank (ties: lower rank)
    assert assign_lpt([7, 7, 6, 6, 5, 5, 4, 4, 4], 4) == [0, 1, 2, 3, 2, 3, 0, 1, 0]
    # the MNIST autoencoder's weight factors (784-1000-500-250-30 and back), cost d^3
    sizes = [784, 1000, 1000, 500, 500, 250, 250, 30, 30, 250, 250, 500, 500, 1000, 1000, 784]
    costs = [float(d) ** 3 for d in sizes]
    for world in (1, 2, 3, 4, 8):
        owners = assign_lpt(costs, world)
        loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(world)]
        assert max(loads) <= (4 / 3 - 1 / (3 * world)) * max(sum(costs) / world, max(costs)) + 1e-6


if __name__ == "__main__":
    main(SCENARIOS)
