"""Command line of the benchmark harness: ``python -m benchmarks [options]``.

Examples::

    python -m benchmarks                                   # digits-ae, every installed method
    python -m benchmarks --problem digits-cnn --epochs 30 --seeds 3
    python -m benchmarks --problem curves-ae --seconds 60 --methods SGD-m,Adam,TNT
    python -m benchmarks --problem mnist-ae --data-dir ~/data/mnist --seconds 500
    python -m benchmarks --problem char-lm --methods AdamW,TNT --seconds 20 --out DIR
    python -m benchmarks --set TNT.lr=3e-4 --set TNT.damping=0.03   # override a setting
    python -m benchmarks --list                            # problems, methods and settings
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .methods import PREFERRED_ORDER, discover_methods
from .plots import plot_curves
from .problems import PROBLEMS, DataOptions, get_problem
from .report import environment, format_table, load_runs, summarize, write_json
from .drive import TURN_STEPS, peak_memory, run_interleaved, run_one
from .runner import Budget, RunResult, warm_up
from .settings import PROBLEM_DEFAULTS, settings_for

__all__ = ["build_parser", "main", "parse_overrides"]

#: Training steps of the short run that measures each method's peak memory when the methods train
#: side by side (their state is resident together there): past the first inversion period of
#: every method's default schedule, where its memory stops growing.
MEMORY_STEPS = 30


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Compare SGD-m, Adam(W), TNT and every installed curvkit method on the paper's problems "
        "at laptop scale and on a character-level GPT (char-lm). Prints a table; writes plots and a JSON file of "
        "every curve to --out.",
    )
    p.add_argument("--problem", default="digits-ae", choices=list(PROBLEMS), help="problem (default: %(default)s)")
    p.add_argument("--methods", default="all",
                   help="comma-separated methods, or 'all' for every installed one the problem runs "
                   "(default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="epoch budget (default: the problem's, see --list)")
    p.add_argument("--seconds", type=float, default=None,
                   help="training-time budget per run in seconds (evaluation excluded); with --epochs or "
                   "--steps, whichever comes first")
    p.add_argument("--steps", type=int, default=None,
                   help="budget in training steps (default: the problem's, for char-lm; see --list)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="record the curves every N steps besides each epoch's end (default: the problem's)")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None, help="minibatch size (default: the problem's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="override one setting, e.g. --set TNT.lr=3e-4 (repeatable)")
    p.add_argument("--data-dir", default=None, help="directory of the MNIST IDX files (mnist-ae)")
    p.add_argument("--n-train", type=int, default=None,
                   help="training-set size (curves-ae: curves generated, default 2000; mnist-ae: first N images)")
    p.add_argument("--n-test", type=int, default=None, help="test-set size (curves-ae default 500)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: the problem's; 1 for the small problems, whose ops are too "
                   "small to gain from threads and whose timings threads make noisy on a busy machine)")
    p.add_argument("--out", default=None, help="output directory (default: benchmarks/results/<problem>/)")
    p.add_argument("--sequential", action="store_true",
                   help="train the methods of each seed one after another, each measuring its peak memory during "
                   "its run, whose time then includes that measurement's allocator setting (glibc maps every "
                   f"allocation from 64 KiB) (default: side by side, one epoch (at most {TURN_STEPS} steps) of each in turn, so that every method's clock sees the "
                   "same machine; peak memory then comes from a short run of each method alone). Side by side "
                   "holds every method's model and state at once: use --sequential where they do not fit together")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.add_argument("--list", action="store_true", help="list problems, installed methods and settings, then exit")
    p.add_argument("--from-json", default=None, action="append", metavar="RESULTS_JSON",
                   help="train nothing: re-render the table and plots of a results.json (into --out, default its "
                   "folder); repeat it to merge the runs of several files of the same problem (seeds run in "
                   "parallel processes, say)")
    return p


def parse_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["TNT.lr=3e-4"]`` -> ``{"TNT": {"lr": 0.0003}}`` (values parsed as Python literals)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        method, dot, option = key.rpartition(".")
        if not sep or not dot or not method or not option:
            raise ValueError(f"--set expects METHOD.KEY=VALUE (for example TNT.lr=3e-4), got {item!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out.setdefault(method, {})[option] = value
    return out


def _select(requested: str, available: Sequence[str], skip: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    if requested.strip().lower() == "all":
        return [m for m in available if m not in skip], []
    names = [n.strip() for n in requested.split(",") if n.strip()]
    if not names:
        raise ValueError("--methods is empty; give names separated by commas, or 'all'")
    lookup = {n.lower(): n for n in available}
    chosen, missing = [], []
    for n in names:
        if n.lower() in lookup:
            chosen.append(lookup[n.lower()])
        elif n in PREFERRED_ORDER:
            missing.append(n)
        else:
            raise ValueError(f"unknown method {n!r}; installed: {', '.join(available)}")
    return chosen, missing


def _list(methods: dict[str, Any]) -> None:
    for name, prob in PROBLEMS.items():
        d = PROBLEM_DEFAULTS[name]
        budget = f"{d.epochs} epochs" if d.epochs is not None else f"{d.steps} steps"
        print(f"{name}: {prob.title}\n  batch {d.batch_size}, {budget} by default. {d.reason}")
        for m in methods:
            if m in prob.skip_methods:
                continue
            s = settings_for(name, m)
            print(f"    {m:14s} {s.kwargs}  -- {s.reason}")
    print("methods installed: " + ", ".join(f"{n} ({s.origin})" for n, s in methods.items()))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison; returns the exit status (0 ok, 1 a run raised, 130 Ctrl-C)."""
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        return _main(args, ["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)])
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before any run finished", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests, notebooks)


def _report_run(label: str, r: RunResult) -> None:
    print(f"{label}{r.method} seed {r.seed}: {r.status}, train loss {r.final_train_loss:.4f} after "
          f"{r.epochs_done:.3g} epochs, {r.train_seconds:.1f} s" + (f"  ({r.message})" if r.message else ""), flush=True)


def _write_outputs(payload: dict[str, Any], results: list[RunResult], out_dir: Path, *, plots: bool) -> None:
    """Print the table; write results.json, table.txt, table.rst and the plots to ``out_dir``."""
    problem = get_problem(payload["problem"])
    target = payload.get("target_test_loss", problem.target_test_loss)
    rows = summarize(results, classifier=problem.classifier, target=target)
    table = format_table(rows, classifier=problem.classifier, test_name=problem.test_name)
    mem = sorted({r.memory_method for r in results if r.memory_method})
    title = problem.title + (" [GENERATED data]" if problem.generated else "")
    print(f"\n{title}\n{table}")
    if problem.name == "char-lm":
        what = "cross-entropy per character (nats)"
    else:
        what = f"{'BCE summed over outputs' if not problem.classifier else 'cross-entropy'} per example"
    subset = (f"{problem.train_eval_examples} fixed training examples" if problem.train_eval_examples
              else "the full training set")
    side = payload.get("schedule") == "interleaved"
    print(f"train loss: mean {what} on {subset}; s/epoch: training steps only"
          + (f", the methods of each seed trained side by side (one epoch, at most {TURN_STEPS} steps, of each in turn)" if side else "")
          + "; opt state: tensor bytes of optimizer.state_dict(); peak RSS: increase during "
          + ("a short run of the method alone" if side else "the run (timed with glibc mapping every allocation from 64 KiB, as the measurement needs)")
          + f", evaluation (in training-size batches) included ({', '.join(mem)})"
          + (f"; to {problem.test_name} {target:g}: steps and training seconds at the first evaluation at or "
             f"below it, over the seeds that reached it" if target is not None else ""))
    write_json(out_dir / "results.json", {**payload, "table": rows})
    (out_dir / "table.txt").write_text(table + "\n")
    (out_dir / "table.rst").write_text(format_table(rows, classifier=problem.classifier, rst=True,
                                                    test_name=problem.test_name) + "\n")
    written = plot_curves(results, out_dir, title=title, classifier=problem.classifier, target=target,
                          test_name=problem.test_name) if plots else []
    print(f"wrote     {out_dir / 'results.json'}, table.txt, table.rst"
          + (", " + ", ".join(p.name for p in written) if written else ""))


def _rerender(args: argparse.Namespace) -> int:
    payloads = []
    for name in args.from_json:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"--from-json: no file {path}")
        payloads.append(json.loads(path.read_text()))
    payload = _merge(payloads) if len(payloads) > 1 else payloads[0]
    out = Path(args.out) if args.out else Path(args.from_json[0]).parent
    _write_outputs(payload, load_runs(payload), out, plots=not args.no_plots)
    return 0


def _merge(payloads: list[dict[str, Any]]) -> dict[str, Any]:
    """One payload holding the runs of several results files of the same problem and budget."""
    first = payloads[0]
    for other in payloads[1:]:
        for key in ("problem", "budget", "batch_size"):
            if other.get(key) != first.get(key):
                raise ValueError(f"--from-json files differ in {key}: {first.get(key)!r} vs {other.get(key)!r}; "
                                 f"only runs of the same problem, budget and batch size can be merged")
    merged = dict(first)
    merged["runs"] = [run for p in payloads for run in p["runs"]]
    merged["seeds"] = sorted({s for p in payloads for s in p.get("seeds", [])})
    merged["command"] = [p.get("command") for p in payloads]
    merged["wall_seconds"] = max(float(p.get("wall_seconds", 0.0)) for p in payloads)
    merged["interrupted"] = any(p.get("interrupted") for p in payloads)
    schedules = {p.get("schedule", "sequential") for p in payloads}
    merged["schedule"] = schedules.pop() if len(schedules) == 1 else "mixed"
    merged["merged_from"] = len(payloads)
    return merged


def _main(args: argparse.Namespace, command: list[str]) -> int:
    if args.from_json:
        return _rerender(args)
    methods, notes = discover_methods()
    if args.list:
        _list(methods)
        return 0
    problem = get_problem(args.problem)
    defaults = PROBLEM_DEFAULTS[problem.name]
    if args.epochs is None and args.seconds is None and args.steps is None:
        budget = Budget(epochs=defaults.epochs, steps=defaults.steps)
    else:
        budget = Budget(epochs=args.epochs, seconds=args.seconds, steps=args.steps)
    eval_every = args.eval_every if args.eval_every is not None else defaults.eval_every
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"--eval-every must be >= 1, got {eval_every}")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    batch_size = args.batch_size or defaults.batch_size
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    threads = args.threads if args.threads is not None else defaults.threads
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    overrides = parse_overrides(args.overrides)
    chosen, missing = _select(args.methods, list(methods), problem.skip_methods)
    unknown = sorted(set(overrides) - set(chosen))
    if unknown:
        raise ValueError(f"--set names methods that are not being run: {', '.join(unknown)}")
    split = problem.load(DataOptions(args.data_dir, args.n_train, args.n_test))
    out_dir = Path(args.out) if args.out else Path("benchmarks") / "results" / problem.name

    absent = [n for n in PREFERRED_ORDER if n not in methods]
    print(f"problem   {problem.name}: {problem.title}")
    print(f"data      {split.n_train} train / {split.n_test} test examples"
          + ("  [GENERATED data, not the original set]" if problem.generated else ""))
    budget_text = " or ".join(filter(None, [budget.epochs and f"{budget.epochs} epochs",
                                            budget.steps and f"{budget.steps} steps",
                                            budget.seconds and f"{budget.seconds:g} s of training"]))
    print(f"budget    {budget_text}, batch {batch_size}, seeds {args.seed}..{args.seed + args.seeds - 1}, "
          f"{torch.get_num_threads()} torch thread(s)")
    print(f"found     {', '.join(methods)}" + (f"   (not installed: {', '.join(absent)})" if absent else ""))
    for note in notes:
        print(f"note      {note}")
    if missing:
        print(f"skipping  {', '.join(missing)}: not installed (install its plugin, or run scripts/setup.sh)")
    if not chosen:
        raise ValueError("no method to run")
    settings = {}
    for m in chosen:
        s = settings_for(problem.name, m)
        settings[m] = {"kwargs": {**s.kwargs, **overrides.get(m, {})}, "reason": s.reason,
                       "overridden": overrides.get(m, {})}
        print(f"  {m:14s} {settings[m]['kwargs']}")

    warm_up(problem, split, batch_size, [methods[m] for m in chosen])
    results: list[RunResult] = []
    interrupted = False
    start = time.perf_counter()
    seeds = range(args.seed, args.seed + args.seeds)
    if args.sequential:
        total = len(chosen) * args.seeds
        for seed in seeds:
            for m in chosen:
                label = f"[{len(results) + 1}/{total}] "
                r = run_one(problem, split, methods[m], settings[m]["kwargs"], seed=seed, batch_size=batch_size,
                            budget=budget, progress=not args.no_progress, position=label, eval_every=eval_every)
                results.append(r)
                _report_run(label, r)
                if r.status == "interrupted":
                    interrupted = True
                    break
            if interrupted:
                break
    else:
        print(f"memory    peak RSS of each method training alone for {MEMORY_STEPS} steps; then the methods of each "
              f"seed train side by side, one epoch (at most {TURN_STEPS} steps) of each in turn", flush=True)
        peaks = {m: peak_memory(problem, split, methods[m], settings[m]["kwargs"], seed=args.seed,
                                batch_size=batch_size, budget=budget, steps=MEMORY_STEPS) for m in chosen}
        for k, seed in enumerate(seeds):
            label = f"[seed {k + 1}/{args.seeds}] "
            runs = run_interleaved(problem, split, [methods[m] for m in chosen], [settings[m]["kwargs"] for m in chosen],
                                   seed=seed, batch_size=batch_size, budget=budget, progress=not args.no_progress,
                                   position=label, eval_every=eval_every)
            for r in runs:
                r.peak_mib, r.memory_method = peaks[r.method]
                results.append(r)
                _report_run(label, r)
            if any(r.status == "interrupted" for r in runs):
                interrupted = True
                break
    wall = time.perf_counter() - start

    payload = {
        "problem": problem.name, "title": problem.title, "generated": problem.generated,
        "command": " ".join(command),
        "budget": {"epochs": budget.epochs, "seconds": budget.seconds, "steps": budget.steps, "eval_every": eval_every},
        "target_test_loss": problem.target_test_loss,
        "batch_size": batch_size, "seeds": list(range(args.seed, args.seed + args.seeds)),
        "data": {"n_train": split.n_train, "n_test": split.n_test, "data_dir": args.data_dir},
        "methods_found": {n: s.origin for n, s in methods.items()}, "methods_not_installed": absent,
        "settings": settings, "environment": environment(), "wall_seconds": wall,
        "interrupted": interrupted, "schedule": "sequential" if args.sequential else "interleaved",
        "runs": [r.to_dict() for r in results],
    }
    _write_outputs(payload, results, out_dir, plots=not args.no_plots)
    print(f"wall time {wall:.1f} s")
    if interrupted:
        print("interrupted: the table holds the runs that finished (and the interrupted one, marked)")
        return 130
    return 1 if any(r.status == "error" for r in results) else 0
