"""Command line of the step-time benchmark: ``python -m benchmarks.steptime [options]``.

Examples::

    python -m benchmarks.steptime                         # batch 1000 and 128, 2 threads, 3 rounds
    python -m benchmarks.steptime --batch 128 --rounds 1 --methods Adam,TNT,KFAC
    python -m benchmarks.steptime --device cuda
    python -m benchmarks.steptime --quick                 # a tiny smoke configuration
    python -m benchmarks.steptime --from-json benchmarks/results/steptime/steptime.json

Every (case, batch) and the floor pieces of each batch are measured in a fresh process
(:mod:`benchmarks.steptime.worker`); a round measures each of them once, and successive rounds
run them in a rotated order, so that drift of a busy machine falls on every case alike. A case's
time is the median over rounds of its mean step time past warm-up; a floor piece's the median
over rounds of its median time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .cases import (
    MNIST_WIDTHS, OWN_SCHEDULE, PAPER_SCHEDULES, QUICK_SCHEDULES, QUICK_WIDTHS, Case, discover_cases,
    measurement_window, peers_installed,
)
from .floor import floor_breakdown
from .worker import MARKER, json_safe

__all__ = ["COLUMNS", "build_parser", "format_pieces", "format_table", "interleave", "main", "parse_schedules",
           "summarize"]

_REPO = Path(__file__).resolve().parents[2]
#: Columns of the table, in order.
COLUMNS = ("method", "schedule", "batch", "ms/step", "x Adam", "floor ms", "x floor", "peer", "x peer",
           "peak MiB", "state MiB", "status")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.steptime",
        description="Time one step of every installed curvkit method (at the paper's schedules), Adam, SGD and "
        "installed peer implementations on the MNIST-autoencoder shapes, against the arithmetic floor of each "
        "method. Prints a table; writes steptime.json, table.txt, table.rst and steptime.png to --out.",
    )
    p.add_argument("--batch", default="1000,128",
                   help="comma-separated batch sizes (default: %(default)s; --quick: 32)")
    p.add_argument("--widths", default=None,
                   help="layer widths of the ReLU autoencoder, comma-separated (default: the MNIST autoencoder "
                   "784,1000,500,250,30,250,500,1000,784; --quick: 64,32,8,32,64); for example "
                   "64,128,64,32,8,32,64,128,64, the digits-ae model of python -m benchmarks")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every measurement (default: %(default)s)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: 3; --quick: 1)")
    p.add_argument("--periods", type=int, default=1,
                   help="inversion periods T2 measured after the warm-up (at least 20 steps; default: %(default)s)")
    p.add_argument("--reps", type=int, default=None, help="repetitions of each floor piece (default: 5; --quick: 2)")
    p.add_argument("--methods", default="all",
                   help="comma-separated method names (e.g. Adam,TNT,KFAC,'ASDL KFAC'), or 'all' (default)")
    p.add_argument("--schedules", default=None,
                   help="comma-separated T1:T2 pairs (default: 1:20,10:100; --quick: 1:2,2:4)")
    p.add_argument("--no-peers", action="store_true", help="skip the peer implementations even where installed")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke configuration: a 64-32-8-32-64 autoencoder, batch 32, short schedules, 1 round")
    p.add_argument("--in-process", action="store_true",
                   help="measure in this process instead of a fresh one per measurement (tests, debugging: "
                   "earlier measurements then warm caches and allocators for later ones)")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="stop measuring after this many minutes (a measurement still running is stopped; the rest "
                   "are reported as skipped; the shortest windows run first)")
    p.add_argument("--job-timeout", type=float, default=1800.0, help="seconds before one measurement is abandoned")
    p.add_argument("--out", default=None, help="output directory (default: benchmarks/results/steptime/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    p.add_argument("--from-json", default=None, metavar="STEPTIME_JSON",
                   help="measure nothing: re-render the table and plot of a steptime.json (into --out, default its folder)")
    return p


def parse_schedules(text: str) -> list[tuple[int, int]]:
    """``"1:20,10:100"`` -> ``[(1, 20), (10, 100)]`` (each ``T1 >= 1``, ``T2 >= 1``)."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split(":")
        try:
            t1, t2 = (int(v) for v in parts)
        except ValueError:
            raise ValueError(f"--schedules expects T1:T2 pairs such as 1:20,10:100, got {item!r}") from None
        if t1 < 1 or t2 < 1:
            raise ValueError(f"--schedules: T1 and T2 must be >= 1, got {item!r}")
        out.append((t1, t2))
    if not out:
        raise ValueError("--schedules is empty; give T1:T2 pairs such as 1:20,10:100")
    return out


def _batches(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--batch expects comma-separated integers such as 1000,128, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"--batch expects positive integers such as 1000,128, got {text!r}")
    return values


def _widths(text: str) -> list[int]:
    try:
        widths = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise ValueError(f"--widths must be comma-separated integers, got {text!r}") from None
    if len(widths) < 2 or any(w < 1 for w in widths) or widths[0] != widths[-1]:
        raise ValueError(
            f"--widths must list at least two positive widths of an autoencoder, the last equal to the first "
            f"(its targets are its inputs), got {text!r}: for example 64,128,64,32,8,32,64,128,64"
        )
    return widths


def interleave(jobs: Sequence[Any], rounds: int) -> list[tuple[int, Any]]:
    """``(round, job)`` in run order: every job once per round, the order rotated by a different
    offset each round (and reversed every other round), so no job always runs first or after the
    same neighbour."""
    order: list[tuple[int, Any]] = []
    n = len(jobs)
    for r in range(rounds):
        shift = (r * max(1, n // max(rounds, 1))) % n if n else 0
        seq = list(jobs[shift:]) + list(jobs[:shift])
        if r % 2:
            seq.reverse()
        order.extend((r, j) for j in seq)
    return order


#: glibc ``malloc`` settings of every worker (unless already set in the environment): a fresh
#: process otherwise maps and unmaps, and page-faults in, every large tensor of every step until
#: its allocator adapts, which cost every method 20-45 % on the MNIST autoencoder at batch 128
#: (Adam included) against the same steps in a long-running training process. These keep large
#: blocks on the heap, as a long run settles to; they are the same for every case and the floor.
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(64 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(256 * 2**20),
    "MALLOC_TOP_PAD_": str(64 * 2**20),
}


def _run_subprocess(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    threads = str(job["threads"])
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    for key, value in MALLOC_ENV.items():
        env.setdefault(key, value)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), env.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.steptime.worker"], input=json.dumps(job),
                              capture_output=True, text=True, timeout=timeout, cwd=_REPO, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "error", "message": f"timed out after {timeout:g} s (--job-timeout)"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    tail = (proc.stderr or proc.stdout)[-2000:]
    return {"status": "error", "message": f"worker exited with {proc.returncode} and no result", "traceback": tail}


def _median(values: Sequence[float]) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else 0.5 * (v[mid - 1] + v[mid])


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) or v in ("nan", "inf", "-inf") else float("nan")


def summarize(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (case, batch): medians over rounds, floor, and the ratios of the table."""
    cases = [Case.from_dict(c) for c in payload["cases"]]
    pieces_by_batch: dict[int, dict[str, float]] = {}
    for batch, rounds in payload["floor"].items():
        ok = [r["pieces"] for r in rounds if r.get("status") == "ok"]
        if ok:
            pieces_by_batch[int(batch)] = {k: _median([_num(r[k]) for r in ok]) for k in ok[0]}
    rows: list[dict[str, Any]] = []
    for batch in payload["batches"]:
        for case in cases:
            runs = payload["runs"].get(f"{case.label}|{batch}", [])
            ok = [r for r in runs if r.get("status") in ("ok", "diverged")]
            ms = _median([_num(r["mean_ms"]) for r in ok]) if ok else float("nan")
            status = "ok" if ok and all(r["status"] == "ok" for r in ok) else (
                "diverged" if ok else (runs[-1].get("status", "missing") if runs else "missing"))
            pieces = pieces_by_batch.get(int(batch))
            floor, breakdown = float("nan"), {}
            if case.recipe is not None and pieces is not None:
                try:
                    breakdown = floor_breakdown(case.recipe, case.schedule, pieces)
                    floor = sum(breakdown.values())
                except ValueError:  # a floor piece is missing from the results: no floor
                    breakdown = {}
            rows.append({
                "label": case.label, "method": case.name, "kind": case.kind,
                "schedule": "own" if case.schedule is None else f"({case.schedule[0]},{case.schedule[1]})",
                "batch": int(batch), "ms": ms,
                "ms_rounds": [_num(r["mean_ms"]) for r in ok],
                "floor_ms": floor, "floor_breakdown": breakdown,
                "peak_mib": _median([_num(r["peak_mib"]) for r in ok]) if ok else float("nan"),
                "state_mib": _median([_num(r["state_mib"]) for r in ok]) if ok else float("nan"),
                "status": status, "message": next((r.get("message", "") for r in runs if r.get("message")), ""),
                "peer_of": case.peer_of, "recipe": case.recipe,
                "warmup": ok[0]["warmup"] if ok else None, "steps": ok[0]["steps"] if ok else None,
            })
    by_key = {(r["method"], r["schedule"], r["batch"]): r for r in rows}
    for r in rows:
        adam = by_key.get(("Adam", "own", r["batch"]))
        r["x_adam"] = r["ms"] / adam["ms"] if adam else float("nan")
        r["x_floor"] = r["ms"] / r["floor_ms"] if r["floor_ms"] == r["floor_ms"] and r["floor_ms"] > 0 else float("nan")
        peer = next((p for p in rows if p["peer_of"] == r["method"] and p["schedule"] == r["schedule"]
                     and p["batch"] == r["batch"] and r["kind"] == "curvkit"), None)
        r["peer"] = peer["method"] if peer else ""
        r["x_peer"] = r["ms"] / peer["ms"] if peer else float("nan")
    return rows


def _fmt(v: Any, digits: int = 1) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:.{digits}f}"
    return str(v)


def format_table(rows: Sequence[dict[str, Any]], *, rst: bool = False) -> str:
    """The table of :data:`COLUMNS` (plain text, or an RST simple table)."""
    body = [[r["method"], r["schedule"], str(r["batch"]), _fmt(r["ms"]), _fmt(r["x_adam"], 2), _fmt(r["floor_ms"]),
             _fmt(r["x_floor"], 2), r["peer"] or "-", _fmt(r["x_peer"], 2), _fmt(r["peak_mib"]),
             _fmt(r["state_mib"]), r["status"]] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(COLUMNS)]
    numeric = {2, 3, 4, 5, 6, 8, 9, 10}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    if rst:
        rule = "  ".join("=" * w for w in widths)
        return "\n".join([rule, line(COLUMNS), rule, *(line(b) for b in body), rule])
    return "\n".join([line(COLUMNS), "  ".join("-" * w for w in widths), *(line(b) for b in body)])


def format_pieces(payload: dict[str, Any]) -> str:
    """The floor pieces (median ms over rounds) per batch, one row per piece."""
    from .floor import PIECES

    batches = [str(b) for b in payload["batches"]]
    cols: dict[str, dict[str, float]] = {}
    for b in batches:
        ok = [r["pieces"] for r in payload["floor"].get(b, []) if r.get("status") == "ok"]
        cols[b] = {k: _median([_num(r[k]) for r in ok]) for k in PIECES if ok and all(k in r for r in ok)}
    head = ["floor piece (ms)", *(f"batch {b}" for b in batches)]
    body = [[k, *(_fmt(cols[b].get(k, float("nan")), 2) for b in batches)] for k in PIECES]
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [head, ["-" * w for w in widths], *body]]
    return "\n".join(lines)


def _plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    batches = sorted({r["batch"] for r in rows}, reverse=True)
    labels = list(dict.fromkeys(f"{r['method']} {r['schedule']}" if r["schedule"] != "own" else r["method"]
                                for r in rows))
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 0.35 * len(labels) + 1.8), squeeze=False,
                             sharey=True)
    colors = {"baseline": "tab:gray", "curvkit": "tab:blue", "peer": "tab:orange"}
    for ax, batch in zip(axes[0], batches):
        sub = {(f"{r['method']} {r['schedule']}" if r["schedule"] != "own" else r["method"]): r
               for r in rows if r["batch"] == batch}
        for i, lab in enumerate(labels):
            r = sub.get(lab)
            if r is None or r["ms"] != r["ms"]:
                continue
            ax.barh(i, r["ms"], color=colors.get(r["kind"], "tab:blue"))
            if r["floor_ms"] == r["floor_ms"]:
                ax.plot([r["floor_ms"]] * 2, [i - 0.4, i + 0.4], color="black", linewidth=2)
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("ms per step (log); black tick: arithmetic floor")
        ax.set_title(f"batch {batch}")
        ax.grid(axis="x", alpha=0.3, which="both")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _environment(device: str) -> dict[str, Any]:
    import curvkit

    env = {"python": platform.python_version(), "torch": torch.__version__, "curvkit": curvkit.__version__,
           "machine": platform.machine(), "platform": platform.platform(), "cpu_count": os.cpu_count()}
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _write_outputs(payload: dict[str, Any], out_dir: Path, *, plot: bool) -> list[dict[str, Any]]:
    rows = summarize(payload)
    table = format_table(rows)
    title = (f"step time, {'-'.join(map(str, payload['widths']))} autoencoder, {payload['device']}, "
             f"{payload['threads']} thread(s)")
    print(f"\n{title}\n{table}")
    print("ms/step: median over rounds of the mean step time past warm-up; floor: the method's arithmetic timed "
          "piece by piece (benchmarks.steptime.floor), amortised by its schedule; x peer: against the other "
          "implementation of the same method and schedule; peak MiB: " + ", ".join(sorted({
              r.get("memory_method", "") for runs in payload["runs"].values() for r in runs if r.get("memory_method")})))
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "table": rows}
    (out_dir / "steptime.json").write_text(json.dumps(json_safe(payload), indent=1, default=str) + "\n")
    (out_dir / "table.txt").write_text(title + "\n" + table + "\n")
    (out_dir / "table.rst").write_text(format_table(rows, rst=True) + "\n")
    pieces = format_pieces(payload)
    print(f"\n{pieces}")
    (out_dir / "pieces.txt").write_text(pieces + "\n")
    written = _plot(rows, out_dir / "steptime.png", title) if plot else None
    print(f"wrote     {out_dir / 'steptime.json'}, table.txt, table.rst, pieces.txt" + (", steptime.png" if written else ""))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns 0, 1 if a measurement failed, 2 for bad options, 130 on Ctrl-C."""
    args = build_parser().parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM ends the run like Ctrl-C: the running measurement's process is stopped with it
        # and what was measured so far is written
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _main(args, ["python -m benchmarks.steptime", *(sys.argv[1:] if argv is None else argv)])
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _select(cases: list[Case], requested: str) -> list[Case]:
    if requested.strip().lower() == "all":
        return cases
    names = [n.strip() for n in requested.split(",") if n.strip()]
    known = {c.name.lower(): c.name for c in cases}
    unknown = [n for n in names if n.lower() not in known]
    if unknown:
        raise ValueError(f"--methods: {', '.join(map(repr, unknown))} not available here; choose from "
                         f"{', '.join(dict.fromkeys(c.name for c in cases))}")
    chosen = {known[n.lower()] for n in names}
    return [c for c in cases if c.name in chosen]


def _main(args: argparse.Namespace, command: list[str]) -> int:
    if args.from_json:
        path = Path(args.from_json)
        if not path.is_file():
            raise FileNotFoundError(f"--from-json: no file {path}")
        _write_outputs(json.loads(path.read_text()), Path(args.out) if args.out else path.parent,
                       plot=not args.no_plot)
        return 0
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch.cuda.is_available() is False here; use --device cpu")
    quick = args.quick
    rounds = args.rounds if args.rounds is not None else (1 if quick else 3)
    reps = args.reps if args.reps is not None else (2 if quick else 5)
    if args.budget_minutes is not None and not args.budget_minutes > 0:
        raise ValueError(f"--budget-minutes must be > 0, got {args.budget_minutes}")
    if rounds < 1 or reps < 1:
        raise ValueError(f"--rounds and --reps must be >= 1, got {rounds} and {reps}")
    batches = _batches(args.batch if not (quick and args.batch == "1000,128") else "32")
    schedules = parse_schedules(args.schedules) if args.schedules else list(QUICK_SCHEDULES if quick else PAPER_SCHEDULES)
    widths = _widths(args.widths) if args.widths else list(QUICK_WIDTHS if quick else MNIST_WIDTHS)
    all_cases, notes, not_installed = discover_cases(schedules, peers=not args.no_peers)
    cases = _select(all_cases, args.methods)
    out_dir = Path(args.out) if args.out else _REPO / "benchmarks" / "results" / "steptime"

    print(f"model     {'-'.join(map(str, widths))} autoencoder, random data, batch {', '.join(map(str, batches))}, "
          f"{args.device}, {args.threads} thread(s), {rounds} round(s)")
    print(f"schedules {', '.join(f'({a},{b})' for a, b in schedules)}; own schedule: "
          + "; ".join(f"{k}: {v}" for k, v in OWN_SCHEDULE.items()))
    print(f"cases     {', '.join(c.label for c in cases)}")
    if not_installed:
        print(f"not installed: {', '.join(not_installed)}")
    for note in notes:
        print(f"note      {note}")

    jobs: list[dict[str, Any]] = []
    for batch in batches:
        base = {"widths": widths, "batch": batch, "threads": args.threads, "device": args.device, "seed": 0}
        jobs.append({**base, "kind": "floor", "reps": reps, "warmup": 0, "steps": 0})
    for case in cases:
        warmup, steps = measurement_window(case, quick=quick, periods=args.periods)
        for batch in batches:
            base = {"widths": widths, "batch": batch, "threads": args.threads, "device": args.device, "seed": 0}
            jobs.append({**base, "kind": "case", "case": case.to_dict(), "warmup": warmup, "steps": steps})
    # shortest windows first (a stable sort keeps the case order): under --budget-minutes the
    # long (10, 100) windows are the ones left out, and every batch is measured alike
    jobs.sort(key=lambda j: j["warmup"] + j["steps"])
    order = interleave(jobs, rounds)
    deadline = None if args.budget_minutes is None else time.perf_counter() + 60.0 * args.budget_minutes
    runs: dict[str, list[dict[str, Any]]] = {}
    floor: dict[str, list[dict[str, Any]]] = {}
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    start = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=len(order), desc="steptime", unit="job", disable=True if args.no_progress else None,
               dynamic_ncols=True, leave=False)
    interrupted = False
    try:
        for r, job in order:
            what = "floor" if job["kind"] == "floor" else Case.from_dict(job["case"]).label
            if deadline is not None and time.perf_counter() > deadline:
                skipped = {"status": "skipped", "message": f"not measured: --budget-minutes {args.budget_minutes:g} spent",
                           "round": r}
                (floor.setdefault(str(job["batch"]), []) if job["kind"] == "floor"
                 else runs.setdefault(f"{what}|{job['batch']}", [])).append(skipped)
                bar.update(1)
                continue
            bar.set_postfix_str(f"round {r + 1}: {what}, batch {job['batch']}", refresh=True)
            if args.in_process:
                from .worker import run_job

                threads = torch.get_num_threads()
                result = json.loads(json.dumps(json_safe(run_job(job)), default=str))
                torch.set_num_threads(threads)
            else:
                timeout = args.job_timeout
                if deadline is not None and deadline - time.perf_counter() < timeout:
                    timeout = max(1.0, deadline - time.perf_counter())
                result = _run_subprocess(job, timeout)
                if deadline is not None and timeout < args.job_timeout and "timed out" in result.get("message", ""):
                    result = {"status": "skipped",
                              "message": f"stopped: --budget-minutes {args.budget_minutes:g} ran out during it"}
            result["round"] = r
            if job["kind"] == "floor":
                floor.setdefault(str(job["batch"]), []).append(result)
            else:
                runs.setdefault(f"{what}|{job['batch']}", []).append(result)
            if result.get("status") == "error":
                bar.write(f"error     {what}, batch {job['batch']}: {result.get('message')}")
            elif not args.quick:
                value = (f"{_num(result['mean_ms']):.1f} ms/step" if "mean_ms" in result
                         else f"{len(result.get('pieces', {}))} pieces")
                bar.write(f"[{r + 1}] {what:24s} batch {job['batch']:5d}: {value} ({_num(result.get('wall_s')):.0f} s)")
            bar.update(1)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    payload = {
        "command": " ".join(command), "widths": widths, "batches": batches, "device": args.device,
        "threads": args.threads, "rounds": rounds, "reps": reps, "schedules": [list(s) for s in schedules],
        "quick": quick, "in_process": args.in_process, "own_schedule": OWN_SCHEDULE, "peers_installed": peers_installed() if not args.no_peers else {},
        "not_installed": not_installed, "cases": [c.to_dict() for c in cases], "runs": runs, "floor": floor,
        "environment": _environment(args.device), "load_average_before": load_before,
        "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "wall_seconds": time.perf_counter() - start, "interrupted": interrupted,
    }
    _write_outputs(payload, out_dir, plot=not args.no_plot)
    print(f"wall time {payload['wall_seconds']:.1f} s; load average before {load_before}, after "
          f"{payload['load_average_after']}")
    if interrupted:
        return 130
    failed = any(r.get("status") == "error" for rs in [*runs.values(), *floor.values()] for r in rs)
    return 1 if failed else 0
