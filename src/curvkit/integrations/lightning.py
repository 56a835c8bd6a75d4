r"""PyTorch Lightning: curvkit optimizers in ``configure_optimizers``, the sampled pass by a callback.

Return a curvkit optimizer from ``configure_optimizers`` as any other; what Lightning cannot do by
itself is the sampled (true-Fisher) backward pass of TNT and KFAC, which must run after the
forward pass and before ``loss.backward()``. :class:`CurvatureCallback` runs it: your
``training_step`` returns the model outputs next to the loss,

.. code-block:: python

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        return {"loss": loss, "outputs": logits}          # the callback needs "outputs"

    trainer = L.Trainer(callbacks=[CurvatureCallback(loss="cross_entropy", class_dim=-1)])

and the callback, right after ``training_step`` returns (Lightning has not run the backward yet),
calls :meth:`~curvkit.CurvatureOptimizer.update_curvature` on the innermost curvkit optimizer,
then hands Lightning the output without ``"outputs"`` (so the logits are not kept for
``on_train_batch_end``). With ``accumulate_grad_batches=k`` it does so on every micro-batch of a
statistics step, and the optimizer feeds the batch-size weighted mean of their sampled gradients
at ``step()`` (layer estimators that accumulate, KFAC, sum each micro-batch's statistics; see
:func:`~curvkit.integrations.feeds_every_micro_batch`). K-BFGS needs nothing more: Lightning's automatic optimisation passes a
closure (training step, zero_grad, backward) to ``optimizer.step``, which K-BFGS calls again after
the update on the same batch.

How the callback gets in between: at ``on_fit_start`` it replaces ``training_step`` on the
module *instance* with a wrapper and restores the method at ``teardown``; Lightning looks the
method up on the instance, so strategies that redirect the forward (DDP) call the wrapper too.

With manual optimisation call ``update_curvature`` yourself on
``self.optimizers().optimizer`` (the optimizer, not Lightning's wrapper; see
:doc:`/howto/trainers`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "curvkit.integrations.lightning needs PyTorch Lightning: pip install 'curvkit[integrations]' "
        "(or pip install lightning)"
    ) from exc

from ..fisher import LossSpec
from ..interfaces import Source
from ..optimizer import CurvatureOptimizer
from ._common import feeds_every_micro_batch, find_curvature_optimizer, sequence_sampler

__all__ = ["CurvatureCallback"]


class CurvatureCallback(pl.Callback):
    """Runs the sampled pass of every curvkit optimizer of the fit inside ``training_step``.

    Args:
        loss: the likelihood of the model outputs (a name, a PyTorch loss standing for one, or a
            sampler; see :mod:`curvkit.fisher`).
        class_dim: the class axis of cross-entropy outputs (``-1`` for ``(batch, time, vocab)``
            logits; see :func:`curvkit.fisher.sampled_loss`).
        reduction: the sampled loss's reduction (``None``: the likelihood's default).
        outputs_key: the key of ``training_step``'s returned dict that holds the outputs.
        keep_outputs: leave the outputs in the returned dict (Lightning then passes them, detached,
            to ``on_train_batch_end``); by default they are removed.

    Raises:
        ValueError: for bad options (at construction), and at the first training step when no
            optimizer of the fit is a curvkit optimizer.
        RuntimeError: when an optimizer needs sampled statistics and ``training_step`` did not
            return a dict with ``outputs_key``.
    """

    def __init__(
        self,
        *,
        loss: LossSpec = "cross_entropy",
        class_dim: int | None = None,
        reduction: str | None = None,
        outputs_key: str = "outputs",
        keep_outputs: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(outputs_key, str) or not outputs_key or outputs_key == "loss":
            raise ValueError(f"outputs_key must be a non-empty string other than 'loss', got {outputs_key!r}")
        if not isinstance(keep_outputs, bool):
            raise ValueError(f"keep_outputs must be a bool, got {keep_outputs!r}")
        self.loss = sequence_sampler(loss, class_dim=class_dim, reduction=reduction)
        self.outputs_key = outputs_key
        self.keep_outputs = keep_outputs
        self._module: pl.LightningModule | None = None
        self._fed_at: dict[int, int] = {}
        self.sampled_passes = 0

    def _optimizers(self, trainer: pl.Trainer) -> list[CurvatureOptimizer]:
        found = [find_curvature_optimizer(o) for o in trainer.optimizers]
        return [o for o in found if o is not None]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._optimizers(trainer):
            raise ValueError(
                "CurvatureCallback found no curvkit optimizer among the trainer's optimizers: return one "
                "(curvkit.TNT(...), curvkit.compose(...)) from configure_optimizers, or drop the callback"
            )
        original = pl_module.training_step
        callback = self

        def training_step(*args: Any, **kwargs: Any) -> Any:
            return callback._after_training_step(trainer, original(*args, **kwargs))

        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._module = pl_module
        self._fed_at = {}

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._module is not None:
            self._module.__dict__.pop("training_step", None)
            self._module = None

    def _after_training_step(self, trainer: pl.Trainer, output: Any) -> Any:
        sampled = [o for o in self._optimizers(trainer) if o.evidence.source is Source.SAMPLED]
        has_outputs = isinstance(output, Mapping) and self.outputs_key in output
        due = [
            o for o in sampled
            if (self._fed_at.get(id(o)) != o.step_count or feeds_every_micro_batch(o))
            and any(o.statistics_due(g) for g in range(len(o.param_groups)))
        ]
        if due and not has_outputs:
            raise RuntimeError(
                f"CurvatureCallback: training_step must return a dict with the model outputs under "
                f"{self.outputs_key!r} next to 'loss' (return {{'loss': loss, {self.outputs_key!r}: logits}}) so "
                f"that the sampled pass of {type(due[0].estimator).__name__} can run before the backward"
            )
        for opt in due:
            # every micro-batch of an accumulated step (accumulate_grad_batches), where the
            # engine accumulates the evidence; otherwise the first one only
            self._fed_at[id(opt)] = opt.step_count
            if opt.update_curvature(output[self.outputs_key], loss=self.loss):
                self.sampled_passes += 1
        if has_outputs and not self.keep_outputs:
            output = {k: v for k, v in output.items() if k != self.outputs_key}
        return output
