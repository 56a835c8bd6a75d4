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
so every method sees the same initial weights and the same minibatches. A :class:`Run` trains
an epoch at a time; :mod:`benchmarks.drive` runs one alone or several side by side.
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
from .memory import state_bytes
from .methods import MethodSpec
from .problems import Problem, evaluate

__all__ = ["Budget", "Run", "RunResult", "warm_up"]

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

    @property
    def unit(self) -> str:
        """The unit progress is shown in: ``"s"`` where a time budget is given, else ``"step"``
        where a step budget is, else ``"epoch"``."""
        return "s" if self.seconds is not None else "step" if self.steps is not None else "epoch"

    @property
    def total(self) -> float:
        """The budget in its :attr:`unit`."""
        return float(self.seconds if self.seconds is not None else self.steps if self.steps is not None else self.epochs)  # type: ignore[arg-type]

    def amount(self, *, seconds: float, steps: int, epochs: float) -> float:
        """Of a training time, step count and epoch count, the one in :attr:`unit`."""
        return {"s": seconds, "step": float(steps), "epoch": epochs}[self.unit]


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


class Run:
    """One (method, seed) run that trains a turn at a time (an epoch, or a slice of one), so that
    several runs can take turns.

    Each run keeps its own copy of torch's global random state (saved when it hands over, restored
    when it resumes): methods that draw from the global generator (sampling seeds, dropout) see
    exactly the numbers they would see alone, so an interleaved run's curves equal a sequential
    run's to every digit. Errors of the optimizer end the run with status ``"error"``; a
    ``KeyboardInterrupt`` propagates (the caller marks the runs it stops).
    """

    def __init__(self, problem: Problem, split: Split, method: MethodSpec, settings: dict[str, Any], *, seed: int,
                 batch_size: int, budget: Budget, eval_every: int | None = None) -> None:
        if batch_size > split.n_train:
            raise ValueError(f"batch_size {batch_size} is larger than the training set ({split.n_train} examples)")
        self.problem, self.split, self.method, self.settings = problem, split, method, settings
        self.seed, self.batch_size, self.budget, self.eval_every = seed, batch_size, budget, eval_every
        self.result = RunResult(method.name, seed, dict(settings))
        self.steps_per_epoch = split.n_train // batch_size  # the last partial batch is dropped
        self.done = False
        self._epoch = 0
        self._perm: Tensor | None = None  # this epoch's data order, while the epoch is under way
        self._next = 0  # the epoch's next step
        self._model: nn.Module | None = None
        self._opt: torch.optim.Optimizer | None = None
        self._order: torch.Generator | None = None
        self._rng: Tensor | None = None
        self._curvature = False
        self._needs_closure = False

    def start(self) -> None:
        """Build the model (seeded) and the optimizer, and record the curves' first point."""
        torch.manual_seed(self.seed)
        self._model = self.problem.build_model()
        self._order = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed + 7919)  # optimizers that draw their sampling seed from torch's generator
        try:
            self._opt = _build(self.method, self._model, self.problem, self.settings)
            self._curvature = self.method.curvature and hasattr(self._opt, "update_curvature")
            self._needs_closure = bool(getattr(self._opt, "needs_closure", False))
            _record(self.result, self._model, self.problem, self.split, 0.0, self.batch_size)
        except Exception as exc:  # a failing optimizer must not take the other runs down
            self._fail(exc)

    def advance(self, max_steps: int | None = None) -> float:
        """Train to the end of the epoch, or ``max_steps`` steps of it (less where the budget runs
        out first; the next call goes on where this one stopped), and return the progress made in
        the budget's unit (epochs, steps or seconds)."""
        result, budget, problem, split, model = self.result, self.budget, self.problem, self.split, self._model
        assert model is not None and self._opt is not None and self._order is not None
        n, batch, steps_per_epoch = split.n_train, self.batch_size, self.steps_per_epoch
        seconds0, steps0 = result.train_seconds, result.steps
        try:
            if self._perm is None:
                self._perm, self._next = torch.randperm(n, generator=self._order), 0
            perm, first = self._perm, self._next
            last = steps_per_epoch if max_steps is None else min(steps_per_epoch, first + max_steps)
            for i in range(first, last):
                self._next = i + 1
                idx = perm[i * batch:(i + 1) * batch]
                x, y = split.x_train[idx], split.y_train[idx]
                start = time.perf_counter()
                loss = _train_step(model, self._opt, problem, x, y, self._curvature, self._needs_closure)
                value = float(loss)
                result.train_seconds += time.perf_counter() - start
                result.steps += 1
                result.step_loss.append(value)
                position = self._epoch + (i + 1) / steps_per_epoch
                if not math.isfinite(value):
                    return self._diverged(f"non-finite training loss at step {result.steps}", seconds0, steps0)
                out_of_time = budget.seconds is not None and result.train_seconds >= budget.seconds
                out_of_steps = budget.steps is not None and result.steps >= budget.steps
                if out_of_time or out_of_steps:
                    self.done = True
                    if i + 1 < steps_per_epoch:
                        if not _record(result, model, problem, split, position, batch):
                            result.status, result.message = "diverged", f"non-finite training loss at epoch {position:.3g}"
                        return self._progress(seconds0, steps0, (i + 1 - first) / steps_per_epoch)
                    break
                if self.eval_every and result.steps % self.eval_every == 0 and i + 1 < steps_per_epoch:
                    if not _record(result, model, problem, split, position, batch):
                        return self._diverged(f"non-finite training loss at step {result.steps}", seconds0, steps0)
            if self._next < steps_per_epoch:  # this turn ended inside the epoch
                return self._progress(seconds0, steps0, (self._next - first) / steps_per_epoch)
            self._perm = None
            self._epoch += 1
            if not _record(result, model, problem, split, float(self._epoch), batch):
                return self._diverged(f"non-finite training loss after epoch {self._epoch}", seconds0, steps0)
            if budget.epochs is not None and self._epoch >= budget.epochs:
                self.done = True
        except Exception as exc:  # a failing optimizer must not take the other runs down
            self._fail(exc)
            return self._progress(seconds0, steps0, 0.0)
        return self._progress(seconds0, steps0, (steps_per_epoch - first) / steps_per_epoch)

    def finish(self) -> RunResult:
        """Measure the optimizer state and release the model and optimizer; returns the result."""
        if self._opt is not None and self.result.status != "error":
            try:
                self.result.state_mib = state_bytes(self._opt.state_dict()) / MIB
            except Exception as exc:
                self._fail(exc)
        self._model = self._opt = None
        self.done = True
        return self.result

    def swap_in(self) -> None:
        """Make this run's random state torch's global one (its own, from the first call on)."""
        if self._rng is not None:
            torch.set_rng_state(self._rng)

    def swap_out(self) -> None:
        self._rng = torch.get_rng_state()

    def _progress(self, seconds0: float, steps0: int, epochs: float) -> float:
        return self.budget.amount(seconds=self.result.train_seconds - seconds0, steps=self.result.steps - steps0,
                                  epochs=epochs)

    def _diverged(self, message: str, seconds0: float, steps0: int) -> float:
        self.result.status, self.result.message = "diverged", message
        self.done = True
        return self._progress(seconds0, steps0, 1.0)

    def _fail(self, exc: Exception) -> None:
        self.result.status = "error"
        self.result.message = f"{type(exc).__name__}: {exc}"
        self.result.traceback = traceback.format_exc()
        self.done = True


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
