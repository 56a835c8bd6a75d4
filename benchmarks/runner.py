"""Train one model with one optimizer under an epoch or wall-clock budget and record its curves.

The training step is the same for every method::

    out = model(x); loss = loss_fn(out, y)
    opt.zero_grad()
    opt.update_curvature(out, loss=problem.curvature_loss)   # curvkit optimizers only
                                     # (char-lm: the logits flattened to (batch * time, vocab))
    loss.backward()
    opt.step(closure if opt.needs_closure else None)

The clock counts training steps only; the evaluation after each epoch, or every ``eval_every``
steps (full training and test sets, or a fixed subset of the training set where the problem says
so; no gradient) is not timed. Optimizers get the problem's param groups where it defines them
(``char-lm``: no weight decay on LayerNorm weights and embeddings). Model initialisation and data order depend on the seed only,
so every method sees the same initial weights and the same minibatches.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .data import Split
from .memory import PeakRSS, state_bytes
from .methods import MethodSpec
from .problems import Problem, evaluate

__all__ = ["Budget", "RunResult", "run_one", "warm_up"]

MIB = 2.0**20


@dataclass(frozen=True)
class Budget:
    """Stop after ``epochs`` epochs, ``steps`` training steps or ``seconds`` of training time,
    whichever are given (several: whichever comes first)."""

    epochs: int | None = None
    seconds: float | None = None
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.epochs is None and self.seconds is None and self.steps is None:
            raise ValueError("a budget needs epochs, steps or seconds (got none)")
        if self.epochs is not None and (not isinstance(self.epochs, int) or self.epochs < 1):
            raise ValueError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.seconds is not None and not (self.seconds > 0 and math.isfinite(self.seconds)):
            raise ValueError(f"seconds must be a finite number > 0, got {self.seconds!r}")


@dataclass
class RunResult:
    """What one (method, seed) run produced.

    ``status`` is ``"ok"``, ``"diverged"`` (a non-finite loss: the run stopped there),
    ``"interrupted"`` (Ctrl-C) or ``"error"`` (the optimizer raised; ``message`` says what).
    Curves hold one point per evaluation: epoch 0 (initial weights), then after every epoch or
    every ``eval_every`` steps (and at the fractional epoch where a budget ran out); ``step``
    holds the training steps done at each point.
    """

    method: str
    seed: int
    settings: dict[str, Any]
    status: str = "ok"
    message: str = ""
    epoch: list[float] = field(default_factory=list)
    step: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    step_loss: list[float] = field(default_factory=list)
    steps: int = 0
    train_seconds: float = 0.0
    state_mib: float = float("nan")
    peak_mib: float = float("nan")
    memory_method: str = ""
    traceback: str = ""

    @property
    def epochs_done(self) -> float:
        return self.epoch[-1] if self.epoch else 0.0

    @property
    def seconds_per_epoch(self) -> float:
        return self.train_seconds / self.epochs_done if self.epochs_done > 0 else float("nan")

    @property
    def final_train_loss(self) -> float:
        return self.train_loss[-1] if self.train_loss else float("nan")

    @property
    def best_train_loss(self) -> float:
        finite = [v for v in self.train_loss if math.isfinite(v)]
        return min(finite) if finite else float("nan")

    def reached(self, target: float) -> tuple[int, float] | None:
        """``(steps, training seconds)`` at the first curve point whose test loss is at or below
        ``target`` (``None`` if no point is)."""
        for step, sec, loss in zip(self.step, self.seconds, self.test_loss):
            if math.isfinite(loss) and loss <= target:
                return step, sec
        return None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(epochs_done=self.epochs_done, seconds_per_epoch=self.seconds_per_epoch,
                 final_train_loss=self.final_train_loss, best_train_loss=self.best_train_loss)
        return d


def _train_eval_subset(problem: Problem, split: Split) -> tuple[Tensor, Tensor]:
    """The training examples the training loss is evaluated on: all, or a fixed random subset."""
    k = problem.train_eval_examples
    if k is None or k >= split.n_train:
        return split.x_train, split.y_train
    idx = torch.randperm(split.n_train, generator=torch.Generator().manual_seed(12345))[:k]
    return split.x_train[idx], split.y_train[idx]


def _record(result: RunResult, model: nn.Module, problem: Problem, split: Split, epoch: float, batch: int) -> bool:
    """Evaluate (in chunks of the training batch size, so that evaluation needs no more memory
    than training) and append one curve point; returns False if the training loss is not finite."""
    x_tr, y_tr = _train_eval_subset(problem, split)
    train_loss, _ = evaluate(model, problem, x_tr, y_tr, batch=batch)
    test_loss, test_acc = evaluate(model, problem, split.x_test, split.y_test, batch=batch)
    result.epoch.append(epoch)
    result.step.append(result.steps)
    result.seconds.append(result.train_seconds)
    result.train_loss.append(train_loss)
    result.test_loss.append(test_loss)
    if test_acc is not None:
        result.test_accuracy.append(test_acc)
    return math.isfinite(train_loss)


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
    """Train a fresh model of ``problem`` with ``method`` and return its :class:`RunResult`.

    ``eval_every`` records a curve point every so many steps besides the end of each epoch.

    The progress bar (``progress=True``) shows only when stderr is a terminal.
    Never raises for a diverging or failing optimizer (the status says so); a
    ``KeyboardInterrupt`` ends the run with status ``"interrupted"`` and what it had so far.
    """
    from tqdm.auto import tqdm

    result = RunResult(method.name, seed, dict(settings))
    n = split.n_train
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} is larger than the training set ({n} examples)")
    steps_per_epoch = n // batch_size  # the last partial batch is dropped: every step sees batch_size examples
    torch.manual_seed(seed)
    model = problem.build_model()
    order = torch.Generator().manual_seed(seed)
    if budget.seconds is not None:
        total, unit = budget.seconds, "s"
    elif budget.steps is not None:
        total, unit = budget.steps, "step"
    else:
        total, unit = budget.epochs, "epoch"
    bar = tqdm(total=total, desc=f"{position}{method.name}", unit=unit, disable=None if progress else True, leave=False,
               dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.4g}/{total:.4g} {unit} [{elapsed}<{remaining}{postfix}]")
    meter = PeakRSS()
    try:
        with meter:
            torch.manual_seed(seed + 7919)  # optimizers that draw their sampling seed from torch's generator
            opt = _build(method, model, problem, settings)
            curvature = method.curvature and hasattr(opt, "update_curvature")
            needs_closure = bool(getattr(opt, "needs_closure", False))
            _record(result, model, problem, split, 0.0, batch_size)
            epoch = 0
            stop = False
            while not stop:
                perm = torch.randperm(n, generator=order)
                for i in range(steps_per_epoch):
                    idx = perm[i * batch_size:(i + 1) * batch_size]
                    x, y = split.x_train[idx], split.y_train[idx]
                    start = time.perf_counter()
                    loss = _train_step(model, opt, problem, x, y, curvature, needs_closure)
                    value = float(loss)
                    elapsed = time.perf_counter() - start
                    result.train_seconds += elapsed
                    result.steps += 1
                    result.step_loss.append(value)
                    if not math.isfinite(value):
                        result.status, result.message = "diverged", f"non-finite training loss at step {result.steps}"
                        stop = True
                        break
                    if budget.seconds is not None:
                        bar.update(elapsed)
                    elif budget.steps is not None:
                        bar.update(1)
                    out_of_time = budget.seconds is not None and result.train_seconds >= budget.seconds
                    out_of_steps = budget.steps is not None and result.steps >= budget.steps
                    if out_of_time or out_of_steps:
                        stop = True
                        if i + 1 < steps_per_epoch:
                            _finish(result, model, problem, split, epoch + (i + 1) / steps_per_epoch, batch_size)
                            break
                    elif eval_every and result.steps % eval_every == 0 and i + 1 < steps_per_epoch:
                        if not _record(result, model, problem, split, epoch + (i + 1) / steps_per_epoch, batch_size):
                            result.status, result.message = "diverged", f"non-finite training loss at step {result.steps}"
                            stop = True
                            break
                        bar.set_postfix_str(f"loss {result.test_loss[-1]:.4g}", refresh=False)
                else:
                    epoch += 1
                    if not _record(result, model, problem, split, float(epoch), batch_size):
                        result.status, result.message = "diverged", f"non-finite training loss after epoch {epoch}"
                        stop = True
                    if budget.seconds is None and budget.steps is None:
                        bar.update(1)
                    bar.set_postfix_str(f"loss {result.train_loss[-1]:.4g}", refresh=False)
                    if budget.epochs is not None and epoch >= budget.epochs:
                        stop = True
            result.state_mib = state_bytes(opt.state_dict()) / MIB
    except KeyboardInterrupt:
        result.status, result.message = "interrupted", "Ctrl-C: the run was stopped by the user"
    except Exception as exc:  # a failing optimizer must not take the other runs down
        result.status = "error"
        result.message = f"{type(exc).__name__}: {exc}"
        result.traceback = traceback.format_exc()
    finally:
        bar.close()
    result.peak_mib = meter.peak_bytes / MIB
    result.memory_method = meter.method
    return result


def warm_up(problem: Problem, split: Split, batch_size: int, methods: Sequence[MethodSpec]) -> None:
    """Two untimed steps of each given method on a throwaway model, so that one-time costs
    (lazy library initialisation, thread pools, first-use allocations) fall on no measured run."""
    x, y = split.x_train[:batch_size], split.y_train[:batch_size]
    for method in methods:
        torch.manual_seed(0)
        model = problem.build_model()
        try:
            opt = _build(method, model, problem, {})
            curvature = method.curvature and hasattr(opt, "update_curvature")
            for _ in range(2):
                _train_step(model, opt, problem, x, y, curvature, bool(getattr(opt, "needs_closure", False)))
            state_bytes(opt.state_dict())
        except Exception:  # the measured run reports the failure
            pass
    x_tr, y_tr = _train_eval_subset(problem, split)
    evaluate(model, problem, x_tr, y_tr, batch=batch_size)


def _build(method: MethodSpec, model: nn.Module, problem: Problem, settings: dict[str, Any]) -> torch.optim.Optimizer:
    """The optimizer, given the problem's param groups where it defines them."""
    if problem.param_groups is None:
        return method.build(model, **settings)
    return method.build(model, params=problem.param_groups(model), **settings)


def _finish(result: RunResult, model: nn.Module, problem: Problem, split: Split, epoch: float, batch: int) -> None:
    if not _record(result, model, problem, split, epoch, batch):
        result.status, result.message = "diverged", f"non-finite training loss at epoch {epoch:.3g}"


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, problem: Problem, x: Tensor, y: Tensor,
                curvature: bool, needs_closure: bool) -> Tensor:
    out = model(x)
    loss = problem.loss_fn(out, y)
    opt.zero_grad()
    if curvature:
        sampled_from = out if problem.curvature_outputs is None else problem.curvature_outputs(out)
        opt.update_curvature(sampled_from, loss=problem.curvature_loss)  # type: ignore[attr-defined]
    loss.backward()
    closure: Callable[[], Tensor] | None = None
    if needs_closure:
        def closure() -> Tensor:
            opt.zero_grad()
            value = problem.loss_fn(model(x), y)
            value.backward()
            return value
    opt.step(closure)
    return loss.detach()
