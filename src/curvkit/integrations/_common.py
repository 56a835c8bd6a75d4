"""What the trainer integrations share: the sampler handed to ``update_curvature`` and finding
the curvkit optimizer behind a trainer's wrappers."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..fisher import REDUCTIONS, LossSpec, resolve_loss, sampled_loss
from ..optimizer import CurvatureOptimizer

__all__ = ["feeds_every_micro_batch", "find_curvature_optimizer", "sequence_sampler"]


def sequence_sampler(
    loss: LossSpec = "cross_entropy",
    *,
    class_dim: int | None = None,
    reduction: str | None = None,
) -> LossSpec:
    """What to pass as ``loss=`` to :meth:`~curvkit.CurvatureOptimizer.update_curvature` so that
    a class axis and a reduction are applied exactly.

    With neither ``class_dim`` nor ``reduction`` this is ``loss`` itself (checked). Otherwise it is
    a sampler ``(outputs, generator) -> scalar`` that calls :func:`curvkit.fisher.sampled_loss`
    with them, so the optimizer's own generator still draws the targets.

    Raises:
        ValueError: for a loss :func:`curvkit.fisher.resolve_loss` refuses, a ``class_dim`` that
            is not a non-zero int (axis 0 is the batch), a ``reduction`` not in
            :data:`curvkit.fisher.REDUCTIONS`, or options given with a sampler of your own.
    """
    name = resolve_loss(loss)
    if not isinstance(name, str):
        if class_dim is not None or reduction is not None:
            raise ValueError(
                "class_dim= and reduction= apply to the named likelihoods; a sampler callable of your own "
                "applies its own (leave them unset)"
            )
        return name
    if class_dim is not None:
        if name != "cross_entropy":
            raise ValueError(f"class_dim={class_dim!r} applies to loss='cross_entropy' only, not {name!r}")
        if not isinstance(class_dim, int) or isinstance(class_dim, bool) or class_dim == 0:
            raise ValueError(
                f"class_dim must be a non-zero int (the class axis; 0 is the batch axis), got {class_dim!r}; "
                f"use class_dim=-1 for (batch, ..., classes) logits"
            )
    if reduction is not None and reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS} or None, got {reduction!r}")
    if class_dim is None and reduction is None:
        return name

    def sampler(outputs: Tensor, generator: torch.Generator | None) -> Tensor:
        return sampled_loss(outputs, name, class_dim=class_dim, reduction=reduction, generator=generator)

    return sampler


def feeds_every_micro_batch(optimizer: CurvatureOptimizer) -> bool:
    """Whether the integrations call ``update_curvature`` on every micro-batch of an accumulated
    step (``True``) or on the first one only.

    The engine accumulates the evidence of several ``update_curvature`` calls before one
    ``step()`` as the whole batch's (:mod:`curvkit.engine.evidence`): the batch-size weighted
    mean of the sampled gradients for estimators that read them (TNT), the summed per-micro-batch
    statistics for layer estimators that accumulate (KFAC, EKFAC). A layer estimator that does
    not (a plugin's without :meth:`~curvkit.CurvatureEstimator.batch_statistics`) gets the first
    micro-batch.
    """
    return not optimizer.evidence.layer_io or optimizer.estimator.accumulates


def find_curvature_optimizer(optimizer: Any) -> CurvatureOptimizer | None:
    """The :class:`~curvkit.CurvatureOptimizer` behind a trainer's optimizer wrappers, or ``None``.

    Lightning's ``LightningOptimizer`` and accelerate's ``AcceleratedOptimizer`` keep the wrapped
    optimizer in ``.optimizer``; this follows that attribute to the innermost optimizer (a
    ``LightningOptimizer`` copies its optimizer's attributes, so only the innermost object holds
    the step counters that :meth:`~curvkit.CurvatureOptimizer.step` reads).
    """
    seen: set[int] = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer if isinstance(optimizer, CurvatureOptimizer) else None
