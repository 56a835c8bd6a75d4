r"""Conformance check of presets (``"method"`` entries of the registry)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from ._common import DataFactory, ModelFactory, Problem, assert_finite, fail, train_step
from .resume import check_exact_resume

__all__ = ["check_method"]


def check_method(
    factory: Callable[..., torch.optim.Optimizer],
    *,
    options: Mapping[str, Any] | None = None,
    make_model: ModelFactory | None = None,
    make_data: DataFactory | None = None,
    loss: str = "cross_entropy",
    steps: int = 4,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
) -> None:
    r"""Check a preset: ``factory(params, model=model, **options)`` returns an optimizer that
    trains a tiny model without NaN and resumes exactly.

    It verifies that the factory returns a :class:`torch.optim.Optimizer`; that ``2 * steps``
    steps of the shared training loop keep the loss and every parameter finite; and that a
    checkpoint (``state_dict`` -> ``torch.save`` -> ``torch.load(weights_only=True)`` -> fresh
    model and optimizer) continues bit for bit like the original.

    Args:
        factory: the preset, for example ``curvkit.TNT`` or ``curvkit.get("method", "TNT")``;
            it must accept ``model=``.
        options: keyword options for the factory (for example ``{"lr": 1e-3}``).
        make_model, make_data, loss: the problem (default: the tiny classifier of
            :func:`~curvkit.testing.default_model`).
        steps: steps before the checkpoint (and after it).
        batch_size: examples per batch.
        dtype: dtype of the model.

    Raises:
        AssertionError: (:class:`~curvkit.testing.ConformanceError`) naming the failed property.
    """
    who = f"method {getattr(factory, '__name__', repr(factory))}"
    problem = Problem(make_model, make_data, loss=loss, dtype=dtype)
    opts = dict(options or {})

    def make_opt(model: nn.Module) -> torch.optim.Optimizer:
        opt = factory(model.parameters(), model=model, **opts)
        if not isinstance(opt, torch.optim.Optimizer):
            fail(who, f"the factory must return a torch.optim.Optimizer, got {type(opt).__name__}")
        return opt

    model = problem.model()
    opt = make_opt(model)
    for t in range(2 * steps):
        x, y = problem.batch(t, batch_size)
        assert_finite(who, f"training loss at step {t}", train_step(model, opt, x, y, problem.loss))
    for name, p in model.named_parameters():
        assert_finite(who, f"parameter {name!r} after {2 * steps} steps", p)
    check_exact_resume(who, problem, make_opt, steps=steps, batch_size=batch_size)
