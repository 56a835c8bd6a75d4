r"""Recording of layer inputs, outputs and output gradients for layer-based estimators.

KFAC-style estimators need, per layer, the inputs :math:`a` of the forward pass and the gradients
:math:`\partial L / \partial s` of the layer outputs (pre-activations) :math:`s` in a backward pass.
:class:`LayerRecorder` registers a forward hook on each watched module that keeps (detached)
references to the inputs and outputs of every call, and a tensor hook on each output that keeps its
gradient. Gradients are filed under the current *phase*: ``"sampled"`` while the optimizer runs the
sampled-target backward (:meth:`LayerRecorder.phase`), ``"minibatch"`` otherwise. A forward
pre-hook on the root model clears the records at the start of every forward pass, so records never
outlive one forward/backward cycle and a module called several times in one forward gets one
entry per call.

Records are only taken while gradients are enabled (not under ``torch.no_grad``), so evaluation
passes cost nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["LayerRecord", "LayerRecorder"]

PHASES = ("sampled", "minibatch")


@dataclass
class LayerRecord:
    """What one module saw in the current forward/backward cycle (one entry per call)."""

    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    output_grads: dict[str, list[Tensor | None]] = field(
        default_factory=lambda: {p: [] for p in PHASES}
    )

    def clear(self) -> None:
        """Drop every entry."""
        self.inputs.clear()
        self.outputs.clear()
        for grads in self.output_grads.values():
            grads.clear()

    def grads(self, phase: str) -> list[Tensor | None]:
        """The output gradients filed under ``phase``, one per call (``None`` if none arrived)."""
        return self.output_grads[phase]


class LayerRecorder:
    """Records inputs, outputs and output gradients of ``modules``.

    Args:
        modules: the layers to watch.
        root: the model; its forward pre-hook clears the records each forward pass. Without a
            root, records are cleared by :meth:`clear` only.
        keep_outputs: also keep the layer outputs (K-BFGS needs the mean pre-activations).
    """

    def __init__(self, modules: Sequence[nn.Module], *, root: nn.Module | None = None, keep_outputs: bool = False) -> None:
        self.records: dict[nn.Module, LayerRecord] = {m: LayerRecord() for m in modules}
        self.keep_outputs = keep_outputs
        self._phase = "minibatch"
        self._handles = [m.register_forward_hook(self._forward_hook) for m in modules]
        if root is not None:
            self._handles.append(root.register_forward_pre_hook(lambda *_: self.clear()))

    def __getitem__(self, module: nn.Module) -> LayerRecord:
        return self.records[module]

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """File gradients produced inside the block under ``name``."""
        if name not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {name!r}")
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    def clear(self) -> None:
        """Drop the records of every watched module."""
        for record in self.records.values():
            record.clear()

    def remove(self) -> None:
        """Remove every hook."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _forward_hook(self, module: nn.Module, args: tuple, output: object) -> None:
        if not torch.is_grad_enabled() or not args or not isinstance(output, Tensor):
            return
        record = self.records[module]
        index = len(record.inputs)
        record.inputs.append(args[0].detach())
        if self.keep_outputs:
            record.outputs.append(output.detach())
        for grads in record.output_grads.values():
            grads.append(None)
        if output.requires_grad:
            def hook(grad: Tensor, record: LayerRecord = record, index: int = index) -> None:
                slots = record.output_grads[self._phase]
                if index < len(slots):
                    slots[index] = grad.detach()

            output.register_hook(hook)
