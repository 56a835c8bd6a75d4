r"""What ``compile_update=True`` buys: TNT's step time with the eager and the compiled update path.

.. code-block:: bash

   python -m benchmarks.steptime.compiled                       # batch 1000 and 128, 2 threads, 3 rounds
   python -m benchmarks.steptime.compiled --batch 128 --rounds 5
   python -m benchmarks.steptime.compiled --quick --batch 32    # the tiny autoencoder

Model, data, loss and TNT's settings are those of ``python -m benchmarks.steptime`` (the TNT
paper's MNIST autoencoder, :mod:`benchmarks.steptime.cases`; TNT at :math:`(T_1, T_2) = (1, 20)`
with the ``mnist-ae`` settings). Each (mode, batch) runs in a fresh Python process with a fresh,
empty inductor cache (``TORCHINDUCTOR_CACHE_DIR``), so every compiled run pays the full compile
time; successive rounds run the modes in alternating order. Per run:

* **first step**: the wall time of step 0 (for the compiled mode this includes compiling);
* **step**: the mean wall time of a whole training step (forward, loss, ``zero_grad``,
  ``update_curvature``, ``backward``, ``step``) over steps 21-60 (``--steps 40``: two inversion
  periods; the warm-up covers the :math:`t < T_2` steps that invert every time);
* **opt.step** and **update path**: the mean time of ``opt.step()`` and of the update rule
  inside it (:class:`curvkit.engine.update.UpdateRule`: momentum, direction, masked update) over
  the same steps.

A case's figure is the median over rounds; compile time is the compiled first step minus the
eager first step.

``--alternating`` times the update path alone, paired: in one process per round, after the
warm-up, it calls the eager :func:`curvkit.engine.update.update_step` and the compiled one
alternately on the same arguments (:func:`measure_alternating`), so that a change of the
machine's load falls on both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

__all__ = ["main", "measure", "measure_alternating"]

MARKER = "COMPILED_RESULT "
WARMUP, STEPS = 21, 40
MODES = ("eager", "compiled")


class _Timed:
    """Wraps the optimizer's update rule and adds up the time spent in it."""

    def __init__(self, rule: Any) -> None:
        self.rule = rule
        self.seconds = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        self.rule(*args, **kwargs)
        self.seconds += time.perf_counter() - start


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """One run (in this process): first-step time, then the means over the measured steps."""
    import torch

    import curvkit

    from ..problems import bce_sum
    from ..settings import settings_for
    from .cases import MNIST_WIDTHS, QUICK_WIDTHS, build_model, make_data

    torch.set_num_threads(int(job["threads"]))
    widths = QUICK_WIDTHS if job["quick"] else MNIST_WIDTHS
    torch.manual_seed(0)
    model = build_model(widths)
    x, y = make_data(widths, int(job["batch"]))
    kwargs = dict(settings_for("mnist-ae", "TNT").kwargs)
    kwargs.update(curvature_every=1, invert_every=20)
    opt = curvkit.TNT(model.parameters(), model=model, compile_update=job["mode"] == "compiled", **kwargs)
    timed = _Timed(opt._update)
    opt._update = timed  # type: ignore[assignment]
    warmup, steps = WARMUP, int(job.get("steps", STEPS))
    first = 0.0
    total = opt_total = 0.0
    for t in range(warmup + steps):
        if t == warmup:
            timed.seconds = 0.0
        start = time.perf_counter()
        out = model(x)
        loss = bce_sum(out, y)
        opt.zero_grad()
        opt.update_curvature(out, loss="bce_with_logits")
        loss.backward()
        mid = time.perf_counter()
        opt.step()
        end = time.perf_counter()
        if t == 0:
            first = end - start
        if t >= warmup:
            total += end - start
            opt_total += end - mid
    return {
        "mode": job["mode"], "batch": job["batch"], "first_step_s": first, "step_ms": 1e3 * total / steps,
        "opt_step_ms": 1e3 * opt_total / steps, "update_ms": 1e3 * timed.seconds / steps,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }


def measure_alternating(job: dict[str, Any]) -> dict[str, Any]:
    """The update path alone, eager and compiled alternately on the same arguments (paired, so a
    change of the machine's load falls on both): after the warm-up steps of a
    ``compile_update=True`` optimizer, ``reps`` rounds of one eager :func:`update_step` call and
    one call of the compiled one, each timed; medians in ms."""
    import torch

    import curvkit
    from curvkit.engine.update import update_step

    from ..problems import bce_sum
    from ..settings import settings_for
    from .cases import MNIST_WIDTHS, QUICK_WIDTHS, build_model, make_data

    torch.set_num_threads(int(job["threads"]))
    widths = QUICK_WIDTHS if job["quick"] else MNIST_WIDTHS
    torch.manual_seed(0)
    model = build_model(widths)
    x, y = make_data(widths, int(job["batch"]))
    kwargs = dict(settings_for("mnist-ae", "TNT").kwargs)
    kwargs.update(curvature_every=1, invert_every=20)
    opt = curvkit.TNT(model.parameters(), model=model, compile_update=True, **kwargs)
    for _ in range(WARMUP):
        out = model(x)
        loss = bce_sum(out, y)
        opt.zero_grad()
        opt.update_curvature(out, loss="bce_with_logits")
        loss.backward()
        opt.step()
    rule = opt._update
    blocks = opt.blocks
    states = [opt.block_state(i) for i in range(len(blocks))]
    groups = [opt.param_groups[b.group] for b in blocks]
    _, args = rule.prepare(blocks, list(range(len(blocks))), states, [s["inverses"] for s in states],
                           lambda p: opt.param_groups[opt._group_of_param[id(p)]], groups)
    g = opt.param_groups[0]  # one param group: every slot has its values, as Python numbers
    hyper = (g["lr"], g["weight_decay"], g["momentum"], 1.0 - g.get("dampening", 0.0))
    eager_args = args[:-1] + ([hyper] * len(args[0].slot_groups),)
    eager: list[float] = []
    compiled: list[float] = []
    with torch.no_grad():
        for _ in range(int(job.get("reps", 20))):
            start = time.perf_counter()
            update_step(*eager_args)
            eager.append(time.perf_counter() - start)
            start = time.perf_counter()
            rule._compiled(*args)
            compiled.append(time.perf_counter() - start)
    return {"batch": job["batch"], "widths": list(widths), "eager_update_ms": 1e3 * statistics.median(eager),
            "compiled_update_ms": 1e3 * statistics.median(compiled), "reps": len(eager),
            "threads": torch.get_num_threads()}


def _run(job: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="inductor-cache-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.steptime.compiled", "--worker", json.dumps(job)],
            capture_output=True, text=True, env=env, check=False,
        )
    for line in proc.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    raise RuntimeError(f"worker failed ({proc.returncode}): {proc.stderr[-2000:]}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.steptime.compiled", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", default="1000,128", help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=STEPS, help="measured steps after the 21 warm-up steps")
    parser.add_argument("--quick", action="store_true", help="the 64-32-8-32-64 autoencoder")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--alternating", action="store_true",
                        help="time the update path alone, eager and compiled alternately in one process per round")
    parser.add_argument("--reps", type=int, default=20, help="alternations per round (--alternating)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        job = json.loads(args.worker)
        print(MARKER + json.dumps(measure_alternating(job) if job.get("alternating") else measure(job)), flush=True)
        return {}
    batches = [int(b) for b in args.batch.split(",") if b]
    if args.alternating:
        pairs = []
        for r in range(args.rounds):
            job = {"alternating": True, "batch": batches[0], "threads": args.threads, "quick": args.quick,
                   "reps": args.reps}
            pairs.append(_run(job))
            print(f"round {r + 1}/{args.rounds}: {pairs[-1]}", file=sys.stderr, flush=True)
        eager = statistics.median(p["eager_update_ms"] for p in pairs)
        compiled = statistics.median(p["compiled_update_ms"] for p in pairs)
        print(f"update path: eager {eager:.3f} ms, compiled {compiled:.3f} ms (median of {args.rounds} rounds "
              f"of {args.reps} alternations)")
        return {"eager_update_ms": eager, "compiled_update_ms": compiled, "runs": pairs}
    runs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for batch in batches:
            for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                job = {"mode": mode, "batch": batch, "threads": args.threads, "quick": args.quick, "steps": args.steps}
                runs.append(_run(job))
                print(f"round {r + 1}/{args.rounds} batch {batch} {mode}: {runs[-1]}", file=sys.stderr, flush=True)
    table = []
    for batch in batches:
        row: dict[str, Any] = {"batch": batch}
        for mode in MODES:
            mine = [x for x in runs if x["batch"] == batch and x["mode"] == mode]
            for key in ("first_step_s", "step_ms", "opt_step_ms", "update_ms"):
                row[f"{mode}_{key}"] = statistics.median(x[key] for x in mine)
        row["compile_s"] = row["compiled_first_step_s"] - row["eager_first_step_s"]
        table.append(row)
    print(f"{'batch':>6} {'mode':>9} {'first step s':>13} {'step ms':>9} {'opt.step ms':>12} {'update ms':>10}")
    for row in table:
        for mode in MODES:
            print(f"{row['batch']:>6} {mode:>9} {row[f'{mode}_first_step_s']:>13.2f} {row[f'{mode}_step_ms']:>9.2f} "
                  f"{row[f'{mode}_opt_step_ms']:>12.2f} {row[f'{mode}_update_ms']:>10.2f}")
        print(f"{row['batch']:>6} compile time {row['compile_s']:.1f} s")
    result = {"command": " ".join(["python -m benchmarks.steptime.compiled", *(argv if argv is not None else sys.argv[1:])]),
              "rounds": args.rounds, "threads": args.threads, "table": table, "runs": runs}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
