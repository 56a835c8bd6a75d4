r"""Sharded inversion and full training steps across gloo ranks: per-rank times at 1, 2 and 4
processes, under DDP and FSDP2.

``python -m benchmarks.distributed [--ranks 1 2 4] [--repeats 5] [--json PATH] [--full-step on]``

The work is one inversion of the TNT factors of the MNIST autoencoder
(784-1000-500-250-30-250-500-1000-784, Ren & Goldfarb 2021): each weight ``(d_out, d_in)`` has
two mode factors (``d_out x d_out`` and ``d_in x d_in``) and each bias one (``d_out x d_out``),
24 factors in all. For each world size ``W`` the script forks ``W`` processes (one thread each,
gloo on 127.0.0.1). Every rank builds the same symmetric positive definite factors; the owners
come from :meth:`curvkit.distributed.Distributor.assign` with cost :func:`~curvkit.distributed.inverse_cost`
(``d^3``); each rank Cholesky-inverts the factors it owns (:func:`torch.linalg.cholesky` then
:func:`torch.cholesky_inverse`), then :meth:`~curvkit.distributed.Distributor.share_` gives
every rank every inverse, timed once with each share strategy (``all_gather`` and
``all_reduce``). A barrier precedes each timed phase; each number is the median over
``--repeats`` repetitions, of the slowest rank. Wall-clock time and the process's CPU time
(:func:`time.process_time`, all threads, gloo's included) are both reported: on a machine
shared with other work the ranks do not run in parallel and wall time cannot fall with the
number of ranks, while CPU time per rank still shows each rank's share of the work.

It also times the participation check (``check=True``): the cost of one small ``average_``
with and without it.

After the run every rank checks that its shared inverses are bit-identical to rank 0's and
that ``F @ F^{-1}`` is the identity to 1e-3 for every factor. The table goes to stdout, the
numbers to ``--json``.

**Full steps** (``--full-step on``; off by default, as it takes minutes): per-rank wall time of
whole TNT training steps (forward, ``update_curvature``, backward, ``step``) on a small MLP
(``--step-widths``, default
256-512-512-10, ``--step-batch`` examples per rank, cross-entropy), under DDP and under FSDP2
(``fully_shard`` on every ``Linear`` and the root), at the same world sizes. The first
``invert_every`` steps (every one an inversion step, :math:`t < T_2`) are a warm-up; then
``--steps`` steps are timed after a barrier, which include the inversion steps of the schedule
(``t mod T_2 = 0``), so the mean is the amortised cost per step. Reported per world size and
setting: the mean step time of the slowest rank (wall and CPU), and the rows of factors each rank
inverted during the timed steps (the divided inverse work). With ``--baseline on`` (the default)
the same loop with :class:`torch.optim.SGD` (momentum 0.9) is timed too: the data-parallel
setting's own cost, against which the curvature optimizer's is read. Each rank's batch is fixed, so the
global batch grows with the number of ranks (weak scaling): on a machine whose cores are shared,
wall time per step cannot stay flat as ranks are added, and the numbers are to be read as
"measured under load".
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

WIDTHS = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]


def factor_sizes(widths: list[int] | None = None) -> list[tuple[str, int]]:
    """``(name, d)`` of every TNT factor of an MLP with these layer widths (default: the MNIST
    autoencoder): per layer the weight's two mode factors, then the bias's."""
    widths = WIDTHS if widths is None else widths
    sizes = []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        sizes.append((f"layer{i}.weight[0]", d_out))
        sizes.append((f"layer{i}.weight[1]", d_in))
        sizes.append((f"layer{i}.bias[0]", d_out))
    return sizes


def make_factor(i: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    a = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    return (a @ a.T / (2 * d) + 0.1 * torch.eye(d, dtype=torch.float64)).to(dtype)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inverse_work(rank: int, repeats: int, dtype_name: str, widths: list[int]) -> dict[str, Any]:
    """One rank's inversions and shares (see the module docstring); runs in the process group."""
    import torch.distributed as dist

    from curvkit.distributed import TorchDistributed, inverse_cost

    dtype = getattr(torch, dtype_name)
    sizes = factor_sizes(widths)
    factors = [make_factor(i, d, dtype) for i, (_, d) in enumerate(sizes)]
    inverses = [torch.empty_like(f) for f in factors]
    distributors = {m: TorchDistributed(share=m) for m in ("all_gather", "all_reduce")}
    owners = distributors["all_gather"].assign([inverse_cost(d) for _, d in sizes])
    mine = [i for i, o in enumerate(owners) if o == rank]
    times: dict[str, list[float]] = {k: [] for k in (
        "inverse", "share_all_gather", "share_all_reduce", "inverse_cpu", "share_all_gather_cpu", "share_all_reduce_cpu")}
    for rep in range(repeats + 1):  # the first repetition warms up and is dropped
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        for i in mine:
            torch.cholesky_inverse(torch.linalg.cholesky(factors[i]), out=inverses[i])
        t1, c1 = time.perf_counter(), time.process_time()
        shares = {}
        for method, dd in distributors.items():
            for i, f in enumerate(inverses):  # a non-owner's buffer holds garbage before share_
                if owners[i] != rank:
                    f.fill_(float("nan"))
            dist.barrier()
            s0, sc0 = time.perf_counter(), time.process_time()
            dd.share_(inverses, owners)
            shares[method] = (time.perf_counter() - s0, time.process_time() - sc0)
        if rep:
            times["inverse"].append(t1 - t0)
            times["inverse_cpu"].append(c1 - c0)
            for method, (t, c) in shares.items():
                times[f"share_{method}"].append(t)
                times[f"share_{method}_cpu"].append(c)
    # correctness: bit-identical to rank 0, and inverses of their factors
    flat = torch.cat([f.reshape(-1) for f in inverses])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    identical = bool(torch.equal(flat, ref))
    residual = max(
        float((f.double() @ inv.double() - torch.eye(f.shape[0], dtype=torch.float64)).abs().max())
        for f, inv in zip(factors, inverses)
    )
    # the participation check's cost: one small average_ with and without it
    check_cost = {}
    for check in (False, True):
        dd = TorchDistributed(check=check)
        x = torch.ones(16)
        for _ in range(5):
            dd.average_([x])
        dist.barrier()
        n = 50
        t0 = time.perf_counter()
        for step in range(n):
            dd.average_([x], call="bench", step=step)
        check_cost["on" if check else "off"] = (time.perf_counter() - t0) / n
    return {
        "rank": rank,
        "owned": [sizes[i][1] for i in mine],
        "owned_cost": sum(inverse_cost(sizes[i][1]) for i in mine),
        "shared_numel": sum(inverses[i].numel() for i in mine),
        "times": times,
        "identical_to_rank0": identical,
        "max_residual": residual,
        "average_small_s": check_cost,
    }


def _step_work(rank: int, setting: str, widths: list[int], batch: int, steps: int, invert_every: int,
               method: str) -> dict[str, Any]:
    """Time ``steps`` full steps of ``method`` (``"TNT"`` or the ``"SGD"`` baseline) on this rank
    under ``setting`` (``"ddp"`` or ``"fsdp2"``); runs in the process group."""
    import torch.distributed as dist
    from torch import nn

    import curvkit

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for d_in, d_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(d_in, d_out), nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    forward: nn.Module = model
    if setting == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m)
        fully_shard(model)
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP

        forward = DDP(model)
    rows = {"n": 0}
    if method == "SGD":  # the data-parallel setting's own cost, for comparison
        opt: Any = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        opt.update_curvature = lambda *a, **k: False
    else:
        opt = curvkit.TNT(model.parameters(), model=model, lr=1e-3, invert_every=invert_every)
        real = opt.inverter.invert

        def counting(matrices: torch.Tensor, **kw: Any) -> torch.Tensor:
            rows["n"] += int(matrices.shape[0])
            return real(matrices, **kw)

        opt.inverter.invert = counting  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, widths[0], generator=g)
    y = torch.randint(0, widths[-1], (batch,), generator=g)

    def one_step() -> None:
        out = forward(x)
        opt.zero_grad()
        opt.update_curvature(out, loss="cross_entropy")
        nn.functional.cross_entropy(out, y).backward()
        opt.step()

    for _ in range(invert_every):  # warm-up: every step before T2 inverts
        one_step()
    rows["n"] = 0
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        one_step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"rank": rank, "step_s": wall / steps, "step_cpu_s": cpu / steps, "inverted_rows": rows["n"]}


def _rank_main(rank: int, world: int, port: int, timeout: float, results: Any, work: Any,
               args: tuple[Any, ...]) -> None:
    """One forked rank: join the gloo group, run ``work(rank, *args)``, send its result.

    ``work`` is a function of its own so that everything it built is freed when it returns
    (what sits in reference cycles, by a ``gc.collect()``), while the process group is still
    registered. A DDP model holds a reducer, which holds the group: were the reducer the group's
    last owner (after ``destroy_process_group``), freeing it would join gloo's worker thread
    with the GIL held, while that thread may be releasing a finished collective's tensors and
    waiting for the GIL: the rank would hang. The result goes through a
    :class:`multiprocessing.SimpleQueue`, written before ``put`` returns (a ``Queue`` writes
    from a feeder thread, which a blocked main thread starves). A rank still running
    after ``timeout`` seconds prints every thread's stack and exits.
    """
    import faulthandler

    import torch.distributed as dist

    faulthandler.dump_traceback_later(timeout, exit=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results.put(work(rank, *args))
        gc.collect()  # what work built in reference cycles goes now, while the group is registered
    finally:
        dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()


def _fork(world: int, work: Any, args: tuple[Any, ...], timeout: float) -> list[dict[str, Any]]:
    """Run ``work(rank, *args)`` in ``world`` forked gloo ranks; their results, by rank.

    Raises:
        RuntimeError: a rank exited with an error or sent no result within ``timeout`` seconds
            (the others are then killed).
    """
    ctx = mp.get_context("fork")
    results = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, timeout, results, work, args))
             for r in range(world)]
    for p in procs:
        p.start()
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout + 30  # the ranks' own watchdogs fire first
    try:
        while len(got) < world:
            if not results.empty():
                got.append(results.get())
                continue
            failed = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode]
            if failed:
                raise RuntimeError(f"{world} ranks: rank {failed[0][0]} exited with code {failed[0][1]}")
            if time.monotonic() > deadline:
                missing = sorted(set(range(world)) - {r["rank"] for r in got})
                raise RuntimeError(f"{world} ranks: no result from ranks {missing} after {timeout:.0f} s")
            time.sleep(0.01)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode]
    if bad:
        raise RuntimeError(f"{world} ranks: rank {bad[0][0]} exited with code {bad[0][1]}")
    return sorted(got, key=lambda r: r["rank"])


def run_steps(world: int, setting: str, widths: list[int], batch: int, steps: int, invert_every: int,
              timeout: float, method: str = "TNT") -> dict[str, Any]:
    """Full-step times of ``world`` ranks under ``setting`` (see the module docstring)."""
    ranks = _fork(world, _step_work, (setting, widths, batch, steps, invert_every, method), timeout)
    return {
        "ranks": world,
        "setting": setting,
        "method": method,
        "step_s_max": max(r["step_s"] for r in ranks),
        "step_cpu_s_max": max(r["step_cpu_s"] for r in ranks),
        "inverted_rows_per_rank": [r["inverted_rows"] for r in ranks],
        "per_rank": ranks,
    }


def render_steps(rows: list[dict[str, Any]]) -> str:
    head = ("setting", "method", "ranks", "step wall ms (slowest rank)", "step CPU ms (slowest rank)",
            "factors inverted per rank")
    lines = [" | ".join(head), " | ".join("-" * len(h) for h in head)]
    for r in rows:
        lines.append(" | ".join([
            r["setting"], r["method"], str(r["ranks"]), f"{1e3 * r['step_s_max']:.1f}", f"{1e3 * r['step_cpu_s_max']:.1f}",
            "/".join(str(n) for n in r["inverted_rows_per_rank"]),
        ]))
    return "\n".join(lines)


def run_world(world: int, repeats: int, dtype: str, timeout: float, widths: list[int]) -> list[dict[str, Any]]:
    """Inversion and share times of ``world`` ranks (see the module docstring)."""
    return _fork(world, _inverse_work, (repeats, dtype, widths), timeout)


def summarise(world: int, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str, r: dict[str, Any]) -> float:
        return statistics.median(r["times"][key])

    inv = [med("inverse", r) for r in ranks]
    return {
        "ranks": world,
        "factors_per_rank": [len(r["owned"]) for r in ranks],
        "cost_share_max": max(r["owned_cost"] for r in ranks) / sum(r["owned_cost"] for r in ranks),
        "inverse_s_max": max(inv),
        "inverse_s_mean": sum(inv) / world,
        "inverse_s_per_rank": inv,
        "share_all_gather_s": max(med("share_all_gather", r) for r in ranks),
        "share_all_reduce_s": max(med("share_all_reduce", r) for r in ranks),
        "inverse_s_max_min": max(min(r["times"]["inverse"]) for r in ranks),
        "inverse_cpu_s_max": max(med("inverse_cpu", r) for r in ranks),
        "share_all_gather_cpu_s": max(med("share_all_gather_cpu", r) for r in ranks),
        "share_all_reduce_cpu_s": max(med("share_all_reduce_cpu", r) for r in ranks),
        "share_all_gather_s_min": max(min(r["times"]["share_all_gather"]) for r in ranks),
        "share_all_reduce_s_min": max(min(r["times"]["share_all_reduce"]) for r in ranks),
        "average_small_check_off_s": max(r["average_small_s"]["off"] for r in ranks),
        "average_small_check_on_s": max(r["average_small_s"]["on"] for r in ranks),
        "identical_to_rank0": all(r["identical_to_rank0"] for r in ranks),
        "max_residual": max(r["max_residual"] for r in ranks),
        "per_rank": ranks,
    }


def render(rows: list[dict[str, Any]]) -> str:
    head = ("ranks", "factors/rank", "max cost share", "inverse CPU s (slowest)", "inverse wall s (slowest)",
            "share all_gather wall/CPU s", "share all_reduce wall/CPU s", "small average_ check off/on ms")
    lines = [" | ".join(head), " | ".join("-" * len(h) for h in head)]
    for r in rows:
        lines.append(" | ".join([
            str(r["ranks"]),
            "/".join(str(n) for n in r["factors_per_rank"]),
            f"{r['cost_share_max']:.2f}",
            f"{r['inverse_cpu_s_max']:.3f}",
            f"{r['inverse_s_max']:.3f}",
            f"{r['share_all_gather_s']:.3f}/{r['share_all_gather_cpu_s']:.3f}",
            f"{r['share_all_reduce_s']:.3f}/{r['share_all_reduce_cpu_s']:.3f}",
            f"{1e3 * r['average_small_check_off_s']:.3f}/{1e3 * r['average_small_check_on_s']:.3f}",
        ]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="world sizes to run")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (after one warm-up)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per world size")
    parser.add_argument("--widths", type=int, nargs="+", default=WIDTHS,
                        help="layer widths of the MLP whose factors are inverted (default: the MNIST autoencoder)")
    parser.add_argument("--full-step", choices=["on", "off"], default="off",
                        help="also time full TNT steps under DDP and FSDP2 (see the module docstring)")
    parser.add_argument("--step-widths", type=int, nargs="+", default=[256, 512, 512, 10],
                        help="layer widths of the MLP trained in the full-step timing")
    parser.add_argument("--step-batch", type=int, default=64, help="examples per rank in the full-step timing")
    parser.add_argument("--steps", type=int, default=20, help="timed full steps (after invert_every warm-up steps)")
    parser.add_argument("--invert-every", type=int, default=10, help="T2 of the TNT run in the full-step timing")
    parser.add_argument("--settings", nargs="+", default=["ddp", "fsdp2"], choices=["ddp", "fsdp2"],
                        help="data-parallel settings of the full-step timing")
    parser.add_argument("--baseline", choices=["on", "off"], default="on",
                        help="also time SGD with momentum in each setting (the setting's own cost)")
    args = parser.parse_args(argv)
    if any(w < 1 for w in args.ranks) or args.repeats < 1:
        parser.error("--ranks and --repeats must be >= 1")
    if len(args.widths) < 2 or any(w < 1 for w in args.widths):
        parser.error("--widths needs at least two widths >= 1")
    if len(args.step_widths) < 2 or any(w < 1 for w in args.step_widths):
        parser.error("--step-widths needs at least two widths >= 1")
    if args.step_batch < 1 or args.steps < 1 or args.invert_every < 1:
        parser.error("--step-batch, --steps and --invert-every must be >= 1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    for world in args.ranks:
        rows.append(summarise(world, run_world(world, args.repeats, args.dtype, args.timeout, args.widths)))
        print(f"ranks={world} done", file=sys.stderr, flush=True)
    print(render(rows))
    step_rows = []
    if args.full_step == "on":
        methods = ["TNT", "SGD"] if args.baseline == "on" else ["TNT"]
        for setting in args.settings:
            for method in methods:
                for world in args.ranks:
                    step_rows.append(run_steps(world, setting, args.step_widths, args.step_batch, args.steps,
                                               args.invert_every, args.timeout, method))
                    print(f"full steps {setting} {method} ranks={world} done", file=sys.stderr, flush=True)
        print()
        print(render_steps(step_rows))
    for r in rows:
        if not r["identical_to_rank0"] or r["max_residual"] > 1e-3:
            print(f"ranks={r['ranks']}: inverses NOT identical/correct: residual {r['max_residual']:.2e}",
                  file=sys.stderr)
            return 1
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": "python -m benchmarks.distributed " + " ".join(sys.argv[1:] if argv is None else argv),
                "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
                "factor_sizes": factor_sizes(args.widths), "dtype": args.dtype, "repeats": args.repeats,
                "full_step": {"widths": args.step_widths, "batch_per_rank": args.step_batch, "steps": args.steps,
                              "invert_every": args.invert_every, "method": "TNT"}}
        args.json.write_text(json.dumps({"meta": meta, "results": rows, "full_steps": step_rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
