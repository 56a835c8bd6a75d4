r"""Work per training step, counted instead of timed: ``python -m benchmarks.work``.

Examples::

    python -m benchmarks.work                                  # digits-ae, every installed method
    python -m benchmarks.work --methods SGD-m,TNT --problem digits-cnn --out DIR

For each method of a problem of ``python -m benchmarks`` (its settings, batch size and training
step), counted over whole inversion periods past the warm-up (the first :math:`T_2 + 1` steps;
then :math:`2 T_2` steps, at least 20, with :math:`T_2` the method's ``invert_every`` or 20):

* **MFlop/step**: the floating-point operations of the matrix products (``mm``, ``addmm``,
  ``bmm``, ``baddbmm``, convolutions and the rest of :class:`torch.utils.flop_counter.FlopCounterMode`'s
  registry) per step. Elementwise work, reductions and matrix decompositions (Cholesky, ``eigh``)
  are not counted;
* **ATen ops/step**: every operator dispatched per step (views included), forward, both
  backward passes and the optimizer, as a :class:`~torch.utils._python_dispatch.TorchDispatchMode`
  sees them;
* **decompositions/step**: the Cholesky, ``eigh``, ``inv``, ``solve`` and QR calls among them;
* each count relative to SGD-m's where SGD-m is among the methods.

A time ratio on a small model mixes arithmetic with the fixed cost of each operation; these
counts separate the two and do not depend on the machine's load. On digits-ae, for instance,
TNT's matrix products are 2.93x SGD-m's (the sampled backward pass, the mode Gram matrices and
the mode products of the direction), so its seconds per epoch cannot fall below about that
ratio, whatever the per-operation overhead (``docs/steptime.rst``).
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .methods import discover_methods
from .problems import DataOptions, get_problem
from .cli import _select
from .report import align_columns, environment, write_json
from .runner import _build, _train_step
from .settings import PROBLEM_DEFAULTS, settings_for

__all__ = ["DECOMPOSITIONS", "count_work", "format_work", "main"]

#: The matrix decompositions counted apart (operator names as ATen spells them).
DECOMPOSITIONS = frozenset({
    "linalg_cholesky_ex", "cholesky", "cholesky_inverse", "linalg_eigh", "_linalg_eigh", "linalg_inv_ex",
    "linalg_solve_ex", "_linalg_solve_ex", "linalg_qr", "linalg_svd", "_linalg_svd", "triangular_solve",
    "linalg_solve_triangular",
})


class _OpCounter(TorchDispatchMode):
    """Counts every ATen operator dispatched while it is active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _period(settings: dict[str, Any]) -> int:
    value = settings.get("invert_every", 20)
    return int(value) if isinstance(value, int) and value > 0 else 20


def count_work(problem_name: str, method_names: Sequence[str], *, steps: int | None = None,
               seed: int = 0) -> list[dict[str, Any]]:
    """One row per method: ``method``, ``steps`` (counted), ``mflop`` (per step), ``ops`` (per
    step), ``decompositions`` (per step) and ``top_ops`` (the ten most frequent operators per
    step). ``steps`` overrides the counted window (``None``: two inversion periods, at least 20)."""
    problem = get_problem(problem_name)
    split = problem.load(DataOptions())
    batch = PROBLEM_DEFAULTS[problem.name].batch_size
    methods, _ = discover_methods()
    unknown = [m for m in method_names if m not in methods]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; installed: {', '.join(methods)}")
    rows = []
    for name in method_names:
        method = methods[name]
        settings = dict(settings_for(problem.name, name).kwargs)
        torch.manual_seed(seed)
        model = problem.build_model()
        torch.manual_seed(seed + 7919)
        opt = _build(method, model, problem, settings)
        curvature = method.curvature and hasattr(opt, "update_curvature")
        closure = bool(getattr(opt, "needs_closure", False))
        period = _period(settings)
        warmup, window = period + 1, steps if steps is not None else max(2 * period, 20)
        n = split.x_train.shape[0] // batch

        def step(i: int) -> None:
            j = i % n
            x, y = split.x_train[j * batch:(j + 1) * batch], split.y_train[j * batch:(j + 1) * batch]
            _train_step(model, opt, problem, x, y, curvature, closure)

        for i in range(warmup):
            step(i)
        ops = _OpCounter()
        with FlopCounterMode(display=False) as flops, ops:
            for i in range(warmup, warmup + window):
                step(i)
        per = {k: v / window for k, v in ops.counts.items()}
        rows.append({
            "method": name, "steps": window, "warmup": warmup,
            "mflop": flops.get_total_flops() / window / 1e6,
            "ops": sum(per.values()),
            "decompositions": sum(v for k, v in per.items() if k in DECOMPOSITIONS),
            "top_ops": dict(sorted(per.items(), key=lambda kv: -kv[1])[:10]),
        })
    base = next((r for r in rows if r["method"] == "SGD-m"), None)
    for r in rows:
        r["mflop_ratio"] = r["mflop"] / base["mflop"] if base and base["mflop"] else None
        r["ops_ratio"] = r["ops"] / base["ops"] if base and base["ops"] else None
    return rows


def format_work(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a plain-text table."""
    head = ("method", "MFlop/step", "x SGD-m", "ATen ops/step", "x SGD-m", "decompositions/step")
    body = [(
        r["method"], f"{r['mflop']:.2f}", "-" if r["mflop_ratio"] is None else f"{r['mflop_ratio']:.2f}",
        f"{r['ops']:.0f}", "-" if r["ops_ratio"] is None else f"{r['ops_ratio']:.2f}", f"{r['decompositions']:.2f}",
    ) for r in rows]
    return align_columns(head, body)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.work", description=__doc__.split("\n")[0])
    p.add_argument("--problem", default="digits-ae", help="a problem of python -m benchmarks (default: digits-ae)")
    p.add_argument("--methods", default="all", help="comma-separated methods, or 'all' (default)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps counted after the warm-up (default: two inversion periods, at least 20)")
    p.add_argument("--out", type=Path, default=None, help="write work.json and work.txt here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    problem = get_problem(args.problem)
    installed, _ = discover_methods()
    names, _ = _select(args.methods, list(installed), problem.skip_methods)
    threads = PROBLEM_DEFAULTS[problem.name].threads
    if threads is not None:
        torch.set_num_threads(threads)
    rows = count_work(problem.name, names, steps=args.steps)
    table = format_work(rows)
    print(f"work per training step, {problem.title}, batch {PROBLEM_DEFAULTS[problem.name].batch_size}\n{table}")
    print("MFlop: matrix products only (decompositions and elementwise work not counted); "
          "ATen ops: every operator dispatched, views included")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "work.json", {"problem": problem.name, "rows": rows, "environment": environment(),
                                            "command": " ".join(["python -m benchmarks.work", *(argv or sys.argv[1:])])})
        (args.out / "work.txt").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
