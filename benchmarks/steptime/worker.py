"""One measurement in a fresh process: ``python -m benchmarks.steptime.worker`` reads a JSON job
from stdin and prints one result line, ``STEPTIME_RESULT {json}``, on stdout.

Jobs are ``{"kind": "case", "case": {...}, ...}`` (time the steps of one method) or
``{"kind": "floor", ...}`` (time the floor pieces). A job that raises reports
``"status": "error"`` with the message and traceback; the parent keeps going.

Peak memory of a case: on CUDA ``torch.cuda.max_memory_allocated`` minus the memory allocated
before the optimizer was built; on CPU the peak increase of resident memory while the optimizer
is built and over the warm-up steps (which hold every kind of step: statistics, inversions),
sampled from ``/proc/self/statm`` by a thread (:class:`benchmarks.memory.PeakRSS`) that is
stopped before the timed steps, so that it takes no CPU from torch's threads while they are
timed. Both include the activations and gradients of the steps, which every method has.
"""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
from typing import Any

import torch

from ..memory import PeakRSS
from .cases import Case, build_model, build_stepper, make_data
from .floor import measure_pieces

__all__ = ["MARKER", "json_safe", "measure_case", "measure_floor", "run_job"]

#: The prefix of the result line.
MARKER = "STEPTIME_RESULT "
MIB = 2.0**20


def _setup(job: dict[str, Any]) -> tuple[torch.device, torch.nn.Sequential, torch.Tensor, torch.Tensor]:
    torch.set_num_threads(int(job["threads"]))
    device = torch.device(job["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch.cuda.is_available() is False")
    torch.manual_seed(int(job.get("seed", 0)))
    model = build_model(job["widths"]).to(device)
    x, y = make_data(job["widths"], int(job["batch"]), device=device, seed=int(job.get("seed", 0)))
    return device, model, x, y


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prewarm(case: Case, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One step of the same method on a throwaway copy of the model before memory is measured,
    so that one-time costs (imports such as ``torch._dynamo`` on an optimizer's first step,
    thread pools, allocator arenas) are not counted as the method's memory."""
    import copy
    import gc

    scratch = copy.deepcopy(model)
    stepper = build_stepper(case, scratch, x, y)
    stepper.step()
    stepper.state_bytes()
    del stepper, scratch
    gc.collect()


def measure_case(job: dict[str, Any]) -> dict[str, Any]:
    """Warm-up steps, then ``steps`` timed steps of one case; mean and spread of the step times."""
    device, model, x, y = _setup(job)
    case = Case.from_dict(job["case"])
    warmup, steps = int(job["warmup"]), int(job["steps"])
    cuda = device.type == "cuda"
    if cuda:
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    _prewarm(case, model, x, y)
    meter = PeakRSS()
    times: list[float] = []
    loss = None

    def run(count: int) -> None:
        nonlocal loss
        for _ in range(count):
            _sync(device)
            start = time.perf_counter()
            loss = stepper.step()
            _sync(device)
            times.append((time.perf_counter() - start) * 1e3)

    with meter:  # memory is sampled while the optimizer is built and over the warm-up steps only
        stepper = build_stepper(case, model, x, y)
        run(warmup)
    run(steps)  # timed without the sampling thread, which would take CPU from torch's threads
    final = float(loss) if loss is not None else float("nan")
    state = stepper.state_bytes()
    measured = times[warmup:]
    mean = sum(measured) / len(measured)
    peak = (torch.cuda.max_memory_allocated(device) - base) if cuda else meter.peak_bytes
    return {
        "status": "ok" if math.isfinite(final) else "diverged",
        "message": "" if math.isfinite(final) else f"non-finite loss {final} at the last step (timings of a diverged run)",
        "mean_ms": mean,
        "min_ms": min(measured),
        "max_ms": max(measured),
        "warmup_ms": sum(times[:warmup]),
        "warmup": warmup,
        "steps": steps,
        "final_loss": final,
        "peak_mib": peak / MIB,
        "memory_method": "cuda max_memory_allocated" if cuda else meter.method,
        "state_mib": state / MIB,
        "note": stepper.note,
    }


def measure_floor(job: dict[str, Any]) -> dict[str, Any]:
    """The floor pieces on the job's shapes and batch."""
    device, model, x, y = _setup(job)
    pieces = measure_pieces(model, x, y, reps=int(job.get("reps", 5)))
    return {"status": "ok", "message": "", "pieces": pieces}


def json_safe(obj: Any) -> Any:
    """A JSON-safe copy: non-finite floats become the strings ``"nan"``, ``"inf"``, ``"-inf"``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job; never raises (errors are reported in the result)."""
    start = time.perf_counter()
    try:
        result = measure_floor(job) if job["kind"] == "floor" else measure_case(job)
    except Exception as exc:  # one failing method must not take the benchmark down
        result = {"status": "error", "message": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    result["wall_s"] = time.perf_counter() - start
    result["threads"] = torch.get_num_threads()
    return result


def main() -> int:
    job = json.loads(sys.stdin.read())
    result = run_job(job)
    print(MARKER + json.dumps(json_safe(result), default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
