r"""Exact-resume check shared by the estimator and method checks."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ._common import Problem, assert_finite, fail, roundtrip, train_step

__all__ = ["check_exact_resume"]


def check_exact_resume(
    who: str,
    problem: Problem,
    make_opt: Callable[[nn.Module], torch.optim.Optimizer],
    *,
    steps: int,
    batch_size: int,
) -> dict[str, Any]:
    """Train ``steps`` steps, checkpoint through ``torch.save``/``torch.load(weights_only=True)``,
    train ``steps`` more on the original and on a fresh model+optimizer loaded from the
    checkpoint, and require bit-identical parameters and losses.

    Returns:
        The reloaded optimizer state dict (for further checks).
    """
    model = problem.model()
    opt = make_opt(model)
    for t in range(steps):
        x, y = problem.batch(1000 + t, batch_size)
        assert_finite(who, f"loss at step {t}", train_step(model, opt, x, y, problem.loss))
    try:
        ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    except Exception as exc:  # noqa: BLE001 - any failure is a conformance failure
        fail(who, f"the optimizer state does not survive torch.save/torch.load(weights_only=True): "
                  f"{type(exc).__name__}: {exc}")
    fresh = problem.model()
    fresh.load_state_dict(ckpt["model"])
    resumed = make_opt(fresh)
    resumed.load_state_dict(roundtrip(ckpt["opt"]))
    for t in range(steps, 2 * steps):
        x, y = problem.batch(1000 + t, batch_size)
        a = train_step(model, opt, x, y, problem.loss)
        b = train_step(fresh, resumed, x, y, problem.loss)
        if not torch.equal(a, b):
            fail(who, f"after resuming from a checkpoint the loss at step {t} differs: {float(a)!r} vs {float(b)!r}")
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        if not torch.equal(p, q):
            err = float((p - q).abs().max())
            fail(who, f"resume is not exact: parameter {name!r} differs by up to {err:.3e} after "
                      f"{steps} steps from a checkpoint")
    return ckpt["opt"]
