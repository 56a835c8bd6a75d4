"""A small grid search, to reproduce (or redo) the tuning recorded in :mod:`benchmarks.settings`.

Example::

    python -m benchmarks.tune --problem digits-ae --method TNT \\
        --grid lr=1e-4,3e-4,1e-3,3e-3 --grid damping=0.03,0.1,0.3 --epochs 100

Every combination trains from the same initial weights and data order (per seed) and is ranked
by its final training loss (``char-lm``: its final validation loss; diverged runs last). The base settings are the recorded ones; each
``--grid`` option replaces one key.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from .methods import discover_methods
from .problems import PROBLEMS, DataOptions, get_problem
from .report import write_json
from .drive import run_one
from .runner import Budget
from .settings import PROBLEM_DEFAULTS, settings_for

__all__ = ["main", "parse_grid"]


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["lr=1e-3,3e-3"]`` -> ``{"lr": [0.001, 0.003]}`` (values parsed as Python literals)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or not raw:
            raise ValueError(f"--grid expects KEY=V1,V2,... (for example lr=1e-3,3e-3), got {item!r}")
        values = []
        for text in raw.split(","):
            try:
                values.append(ast.literal_eval(text))
            except (ValueError, SyntaxError):
                values.append(text)
        grid[key] = values
    return grid


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--problem", default="digits-ae", choices=list(PROBLEMS))
    p.add_argument("--method", required=True)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the problem's)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/<problem>/tune_<method>.json)")
    args = p.parse_args(argv)
    try:
        problem = get_problem(args.problem)
        methods, _ = discover_methods()
        if args.method not in methods:
            raise ValueError(f"method {args.method!r} is not installed; installed: {', '.join(methods)}")
        defaults = PROBLEM_DEFAULTS[problem.name]
        threads = args.threads if args.threads is not None else defaults.threads
        if threads is not None:
            torch.set_num_threads(threads)
        if args.epochs is None and args.seconds is None and args.steps is None:
            budget = Budget(epochs=defaults.epochs, steps=defaults.steps)
        else:
            budget = Budget(epochs=args.epochs, seconds=args.seconds, steps=args.steps)
        eval_every = args.eval_every if args.eval_every is not None else defaults.eval_every
        grid = parse_grid(args.grid)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    split = problem.load(DataOptions(args.data_dir, args.n_train, args.n_test))
    base = settings_for(problem.name, args.method).kwargs
    keys = list(grid)
    rows = []
    for combo in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
        kwargs = {**base, **dict(zip(keys, combo))}
        runs = [run_one(problem, split, methods[args.method], kwargs, seed=s, batch_size=args.batch_size or defaults.batch_size,
                        budget=budget, progress=False, eval_every=eval_every) for s in range(args.seeds)]
        if problem.rank_by == "test_loss":
            finals = [r.test_loss[-1] for r in runs if r.status == "ok" and r.test_loss]
        else:
            finals = [r.final_train_loss for r in runs if r.status == "ok"]
        diverged = sum(r.status != "ok" for r in runs)
        final = statistics.fmean(finals) if finals and not diverged else math.inf
        spe = statistics.fmean([r.seconds_per_epoch for r in runs if r.status == "ok"] or [math.nan])
        acc = [max(r.test_accuracy) for r in runs if r.status == "ok" and r.test_accuracy]
        rows.append({"settings": kwargs, f"final_{problem.rank_by}": final, "rank_value": final, "not_ok": diverged, "seconds_per_epoch": spe,
                     "runs": [r.to_dict() for r in runs]})
        hits = [r.reached(problem.target_test_loss) for r in runs] if problem.target_test_loss is not None else []
        reach = [h[0] for h in hits if h is not None]
        print(f"{kwargs}: final {problem.rank_by.replace('_', ' ')} {final:.4f}"
              + (f" ({diverged} not ok)" if diverged else "")
              + (f", steps to {problem.target_test_loss:g}: {reach or 'not reached'}" if hits else "")
              + (f", best test accuracy {100 * statistics.fmean(acc):.2f}%" if acc else "")
              + f", {spe:.3f} s/epoch", flush=True)
    rows.sort(key=lambda r: r["rank_value"])
    print("best:", rows[0]["settings"], f"{rows[0]['rank_value']:.4f}")
    out = Path(args.out) if args.out else Path("benchmarks") / "results" / problem.name / f"tune_{args.method}.json"
    write_json(out, {"problem": problem.name, "method": args.method, "grid": grid,
                     "budget": {"epochs": budget.epochs, "seconds": budget.seconds}, "results": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
