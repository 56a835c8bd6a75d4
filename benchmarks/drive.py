"""How several runs are driven: one after another, or side by side.

:func:`run_one` trains one method alone and measures its peak resident memory during the run;
:func:`run_interleaved` trains several side by side, one epoch of each in turn (at most
:data:`TURN_STEPS` steps of it; each run with its own random state, so the curves are those of a
run alone to every digit), so that a ratio of their times compares methods that ran through the
same states of the machine;
:func:`peak_memory` measures a method's memory in a short run alone, for the side-by-side runs,
whose memory is resident together. Each run is a :class:`~benchmarks.runner.Run`.
"""

from __future__ import annotations

from typing import Any, Sequence

from .data import Split
from .memory import PeakRSS
from .methods import MethodSpec
from .problems import Problem
from .runner import MIB, Budget, Run, RunResult

__all__ = ["TURN_STEPS", "peak_memory", "run_interleaved", "run_one"]

#: The most training steps a run takes in one turn side by side: an epoch of the small problems
#: (digits: 11-14 steps), a slice of a long one (char-lm: hundreds of steps per epoch), so that
#: every method's turns stay a few seconds apart.
TURN_STEPS = 50


def _bar(total: float, unit: str, desc: str, progress: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None if progress else True, leave=False, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.4g}/{total:.4g} {unit} [{elapsed}<{remaining}{postfix}]")


def run_one(
    problem: Problem,
    split: Split,
    method: MethodSpec,
    settings: dict[str, Any],
    *,
    seed: int,
    batch_size: int,
    budget: Budget,
    progress: bool = True,
    position: str = "",
    eval_every: int | None = None,
) -> RunResult:
    """Train a fresh model of ``problem`` with ``method`` and return its :class:`RunResult`, its
    peak resident memory measured during the run.

    ``eval_every`` records a curve point every so many steps besides the end of each epoch.

    The progress bar (``progress=True``) shows only when stderr is a terminal.
    Never raises for a diverging or failing optimizer (the status says so); a
    ``KeyboardInterrupt`` ends the run with status ``"interrupted"`` and what it had so far.
    """
    run = Run(problem, split, method, settings, seed=seed, batch_size=batch_size, budget=budget, eval_every=eval_every)
    total, unit = budget.total, budget.unit
    bar = _bar(total, unit, f"{position}{method.name}", progress)
    meter = PeakRSS()
    try:
        with meter:
            run.start()
            while not run.done:
                bar.update(run.advance())
                if run.result.train_loss:
                    bar.set_postfix_str(f"loss {run.result.train_loss[-1]:.4g}", refresh=False)
            run.finish()
    except KeyboardInterrupt:
        run.result.status, run.result.message = "interrupted", "Ctrl-C: the run was stopped by the user"
        run.finish()
    finally:
        bar.close()
    run.result.peak_mib = meter.peak_bytes / MIB
    run.result.memory_method = meter.method
    return run.result


def run_interleaved(
    problem: Problem,
    split: Split,
    methods: Sequence[MethodSpec],
    settings: Sequence[dict[str, Any]],
    *,
    seed: int,
    batch_size: int,
    budget: Budget,
    progress: bool = True,
    position: str = "",
    eval_every: int | None = None,
    turn_steps: int = TURN_STEPS,
) -> list[RunResult]:
    """Train one fresh model per method side by side: each run trains one epoch (at most
    ``turn_steps`` steps of it) in turn, round after round, until every run has spent its budget, so that every method's clock runs through
    the same states of the machine (a busy neighbour, frequency scaling, a slow phase of the host)
    instead of each method meeting its own. The curves equal :func:`run_one`'s to every digit
    (each run keeps its own random state); peak memory is not measured here (the runs' memory is
    resident together; :func:`peak_memory` measures it alone).

    A ``KeyboardInterrupt`` marks the unfinished runs ``"interrupted"`` and returns what they had.
    """
    if not (isinstance(turn_steps, int) and turn_steps >= 1):
        raise ValueError(f"turn_steps must be an integer >= 1, got {turn_steps!r}")
    runs = [Run(problem, split, m, s, seed=seed, batch_size=batch_size, budget=budget, eval_every=eval_every)
            for m, s in zip(methods, settings)]
    total, unit = budget.total, budget.unit
    bar = _bar(total * len(runs), unit, f"{position}seed {seed}", progress)
    current: Run | None = None
    try:
        for run in runs:
            current = run
            run.start()
            run.swap_out()
        while not all(run.done for run in runs):
            for run in runs:
                if run.done:
                    continue
                current = run
                run.swap_in()
                made = run.advance(turn_steps)
                run.swap_out()
                bar.update(made)
                bar.set_postfix_str(run.method.name, refresh=False)
                if run.done:
                    spent = budget.amount(seconds=run.result.train_seconds, steps=run.result.steps,
                                          epochs=run.result.epochs_done)
                    bar.update(max(0.0, total - spent))  # a run that stopped early
                    run.finish()
    except KeyboardInterrupt:
        for run in runs:
            if not run.done or run is current:
                run.result.status, run.result.message = "interrupted", "Ctrl-C: the run was stopped by the user"
    finally:
        bar.close()
        for run in runs:
            run.finish()
    return [run.result for run in runs]


def peak_memory(problem: Problem, split: Split, method: MethodSpec, settings: dict[str, Any], *, seed: int,
                batch_size: int, budget: Budget, steps: int = 100) -> tuple[float, str]:
    """``(MiB, how)``: the peak resident memory of ``method`` training alone for ``steps`` steps
    (fewer where ``budget`` ends first), evaluation included, as :func:`run_one` measures it.
    A ``KeyboardInterrupt`` propagates."""
    short = Budget(epochs=budget.epochs, seconds=budget.seconds, steps=min(steps, budget.steps or steps))
    result = run_one(problem, split, method, settings, seed=seed, batch_size=batch_size, budget=short, progress=False)
    if result.status == "interrupted":
        raise KeyboardInterrupt
    return result.peak_mib, f"{result.memory_method}, {result.steps} steps alone"
