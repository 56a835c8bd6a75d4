r"""Hugging Face ``transformers``: a ``Trainer`` that runs the sampled pass and gives K-BFGS its closure.

``transformers.Trainer`` calls ``compute_loss`` (the forward pass), then the backward, then
``optimizer.step()`` without a closure, and it offers no callback between the forward and the
backward. :class:`CurvatureTrainer` overrides ``compute_loss``: after the forward pass of a
training step it calls :meth:`~curvkit.CurvatureOptimizer.update_curvature` on the model's
logits (``outputs.logits``, classes last, so ``class_dim=-1`` by default) -- on every micro-batch
with ``gradient_accumulation_steps > 1`` (see
:func:`~curvkit.integrations.feeds_every_micro_batch`) -- and for optimizers that
re-evaluate the loss after the update (K-BFGS) it makes ``optimizer.step()`` use a closure that
repeats the forward and backward pass on the same inputs.

.. code-block:: python

    opt = curvkit.TNT(model.parameters(), lr=1e-3, damping=0.1)
    trainer = CurvatureTrainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    trainer.train()
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

try:
    import transformers
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "curvkit.integrations.transformers needs Hugging Face transformers (and accelerate): "
        "pip install 'curvkit[integrations]'"
    ) from exc

from ..fisher import LossSpec
from ..interfaces import Source
from ..optimizer import CurvatureOptimizer
from ._common import feeds_every_micro_batch, find_curvature_optimizer, sequence_sampler

__all__ = ["CurvatureTrainer"]


class CurvatureTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` for curvkit optimizers (passed as ``optimizers=(opt, scheduler)``).

    Every argument of ``transformers.Trainer`` is accepted; the keyword-only options are:

    Args:
        curvature_loss: the likelihood of the outputs (a name, a PyTorch loss standing for one, or
            a sampler; see :mod:`curvkit.fisher`); ``"cross_entropy"`` for language models and
            classifiers.
        class_dim: the class axis of the outputs (``-1``: logits ``(batch, ..., classes)``, as
            every ``transformers`` head returns them; ``None``: read from the rank, see
            :func:`curvkit.fisher.sampled_loss`).
        outputs_attr: the attribute (or key) of the model output holding what is sampled from.
        reduction: the sampled loss's reduction (``None``: the likelihood's default).

    Raises:
        ValueError: for bad options; when training starts with a closure-needing optimizer
            (K-BFGS) and ``gradient_accumulation_steps > 1`` (the closure would see one
            micro-batch of the accumulated step).
    """

    def __init__(
        self,
        *args: Any,
        curvature_loss: LossSpec = "cross_entropy",
        class_dim: int | None = -1,
        outputs_attr: str = "logits",
        reduction: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(outputs_attr, str) or not outputs_attr:
            raise ValueError(f"outputs_attr must be a non-empty string, got {outputs_attr!r}")
        self.curvature_loss = sequence_sampler(curvature_loss, class_dim=class_dim, reduction=reduction)
        self.outputs_attr = outputs_attr
        self.sampled_passes = 0
        self._fed_at: int | None = None
        self._closure: Callable[[], Tensor] | None = None
        self._in_closure = False
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ helpers
    def curvature_optimizer(self) -> CurvatureOptimizer | None:
        """The curvkit optimizer behind ``self.optimizer`` (``None`` before it exists, or if it is
        not a curvkit optimizer)."""
        return find_curvature_optimizer(self.optimizer) if self.optimizer is not None else None

    def _outputs_of(self, outputs: Any) -> Tensor:
        value = outputs.get(self.outputs_attr) if isinstance(outputs, dict) else None
        if value is None:
            value = getattr(outputs, self.outputs_attr, None)
        if not isinstance(value, Tensor):
            raise RuntimeError(
                f"CurvatureTrainer: the model output has no tensor {self.outputs_attr!r} to sample from; "
                f"pass outputs_attr= naming the logits of {type(outputs).__name__}"
            )
        return value

    def _bind_closure(self, opt: CurvatureOptimizer) -> None:
        """Make ``opt.step()`` without a closure use the trainer's closure of the current batch
        (``transformers`` calls ``optimizer.step()`` with none)."""
        if getattr(opt, "_curvkit_trainer_closure", None) is not None:
            return
        if self.args.gradient_accumulation_steps > 1:
            raise ValueError(
                f"{type(opt.estimator).__name__} re-evaluates the loss after each update on the same batch, which "
                f"gradient accumulation (gradient_accumulation_steps={self.args.gradient_accumulation_steps}) "
                f"splits into micro-batches: train with gradient_accumulation_steps=1"
            )
        original = opt.step
        trainer = self

        def step(closure: Callable[[], Tensor] | None = None) -> Tensor | None:
            return original(closure if closure is not None else trainer._closure)

        opt._curvkit_trainer_closure = True  # type: ignore[attr-defined]
        opt.step = step  # type: ignore[method-assign]

    # ------------------------------------------------------------------ the override
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """The ``Trainer``'s loss; on a training forward pass, also the sampled pass (when the
        optimizer's statistics are due) and the closure for K-BFGS."""
        kept = dict(inputs)  # compute_loss may pop the labels
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        opt = self.curvature_optimizer()
        if opt is not None and model.training and torch.is_grad_enabled() and not self._in_closure:
            if opt.evidence.source is Source.SAMPLED and (self._fed_at != opt.step_count or feeds_every_micro_batch(opt)):
                # every micro-batch of an accumulated step (gradient_accumulation_steps), where
                # the engine accumulates the evidence; otherwise the first one only
                self._fed_at = opt.step_count
                if opt.update_curvature(self._outputs_of(outputs), loss=self.curvature_loss):
                    self.sampled_passes += 1
            if opt.needs_closure:
                self._bind_closure(opt)
                self._closure = self._make_closure(model, kept, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _make_closure(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any) -> Callable[[], Tensor]:
        def closure() -> Tensor:
            self._in_closure = True
            try:
                with torch.enable_grad(), self.compute_loss_context_manager():
                    loss = super(CurvatureTrainer, self).compute_loss(
                        model, dict(inputs), num_items_in_batch=num_items_in_batch
                    )
                self.accelerator.backward(loss)
            finally:
                self._in_closure = False
            return loss.detach()

        return closure
