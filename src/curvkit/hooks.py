r"""Recording of layer inputs, outputs and output gradients for layer-based estimators.

KFAC-style estimators need, per layer, the inputs :math:`a` of the forward pass and the gradients
:math:`\partial L / \partial s` of the layer outputs (pre-activations) :math:`s` in a backward pass.
:class:`LayerRecorder` registers a forward hook on each watched module that keeps (detached)
references to the inputs (and, with ``keep_outputs``, the outputs) of every call, and a tensor hook
on each output that keeps its gradient. Gradients are filed under the current *phase*:
``"sampled"`` while the optimizer runs the sampled-target backward (:meth:`LayerRecorder.phase`),
``"minibatch"`` otherwise. A forward pre-hook on the root model clears the records at the start of
every forward pass, so records never outlive one forward/backward cycle and a module called
several times in one forward gets one entry per call. Before the records of a forward pass are
dropped, an optional callback (:meth:`LayerRecorder.on_replace`) may read them: the optimizer
gathers there the statistics of a finished micro-batch under gradient accumulation.

Records are only taken while gradients are enabled (not under ``torch.no_grad``), so evaluation
passes cost nothing.

**Output-only backward.** An estimator that reads only layer inputs and output gradients (KFAC,
``EvidenceSpec.parameter_gradients=False``) does not need the parameter gradients of the sampled
backward. :meth:`LayerRecorder.differentiate` runs that backward with respect to the recorded layer
outputs of the current forward only, so autograd skips every weight-gradient product, and files
the gradients exactly as the tensor hooks would. For that the recorder holds the (non-detached)
outputs of the current forward until the next forward pass or the next :meth:`differentiate`.

**Lifetime.** The hooks installed on the model are module-level callables that hold only a weak
reference to the recorder: they never keep it (or its records, which hold the last batch's
activations) alive, they do nothing once it is gone, and a finaliser removes them from the model
when the recorder is garbage collected. :meth:`LayerRecorder.remove` removes them at once. The hooks
pickle to inert hooks, so ``torch.save(model)`` works while an optimizer watches the model and a
reloaded model records nothing.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

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


def _inert(kind: type) -> Any:
    """Unpickling target of the recorder's hooks: a hook that does nothing."""
    return kind(None)


class _RecorderHook:
    """Base of the hooks a recorder installs: a weak reference to the recorder, pickled as inert."""

    __slots__ = ("_ref",)

    def __init__(self, recorder: "LayerRecorder | None") -> None:
        self._ref = None if recorder is None else weakref.ref(recorder)

    def _recorder(self) -> "LayerRecorder | None":
        return None if self._ref is None else self._ref()

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (_inert, (type(self),))


class _ForwardHook(_RecorderHook):
    """Forward hook of a watched module: records the call in the recorder, if it still exists."""

    __slots__ = ()

    def __call__(self, module: nn.Module, args: tuple, output: object) -> None:
        recorder = self._recorder()
        if recorder is not None:
            recorder._record_call(module, args, output)


class _ClearHook(_RecorderHook):
    """Forward pre-hook of the root model: clears the recorder at the start of every forward."""

    __slots__ = ()

    def __call__(self, module: nn.Module, args: tuple) -> None:
        recorder = self._recorder()
        if recorder is not None:
            if torch.is_grad_enabled():
                recorder._before_replace()
            recorder.clear()
            if torch.is_grad_enabled():
                recorder.forwards += 1
                recorder.forward_id += 1


class _GradHook(_RecorderHook):
    """Tensor hook on one recorded output: files its gradient under the recorder's phase."""

    __slots__ = ("_record", "_index")

    def __init__(self, recorder: "LayerRecorder | None", record: LayerRecord | None = None, index: int = 0) -> None:
        super().__init__(recorder)
        self._record = record
        self._index = index

    def __call__(self, grad: Tensor) -> None:
        recorder = self._recorder()
        if recorder is not None and self._record is not None:
            recorder._file_grad(self._record, self._index, grad)


def _remove_handles(handles: list[Any]) -> None:
    for h in handles:
        h.remove()
    handles.clear()


class LayerRecorder:
    """Records inputs, outputs and output gradients of ``modules``.

    Args:
        modules: the layers to watch.
        root: the model; its forward pre-hook clears the records each forward pass. Without a
            root, records are cleared by :meth:`clear` only.
        keep_outputs: also keep the (detached) layer outputs in ``LayerRecord.outputs``
            (K-BFGS needs the mean pre-activations; ``EvidenceSpec.layer_outputs``). Off by
            default: a recorder keeps no output an estimator does not read.
    """

    def __init__(self, modules: Sequence[nn.Module], *, root: nn.Module | None = None, keep_outputs: bool = False) -> None:
        if not isinstance(keep_outputs, bool):
            raise ValueError(f"keep_outputs must be a bool (True or False), got {keep_outputs!r}")
        self.records: dict[nn.Module, LayerRecord] = {m: LayerRecord() for m in modules}
        self.keep_outputs = keep_outputs
        self._phase = "minibatch"
        #: Forward passes of the root with gradients enabled since the optimizer last reset it
        #: (more than one before a ``step()`` means micro-batches whose records were replaced).
        self.forwards = 0
        #: Forward passes of the root with gradients enabled since the recorder was built (never
        #: reset): tells whether the current records were already read.
        self.forward_id = 0
        #: Called (weakly held) at the start of a forward pass with gradients enabled, before
        #: the records of the previous one are dropped: the optimizer gathers the statistics of
        #: a finished micro-batch there (see :meth:`on_replace`).
        self._on_replace: "weakref.WeakMethod | None" = None
        #: (record, call index, output) of the current forward, for :meth:`differentiate`.
        self._live: list[tuple[LayerRecord, int, Tensor]] = []
        self._handles: list[Any] = [m.register_forward_hook(_ForwardHook(self)) for m in self.records]
        if root is not None:
            self._handles.append(root.register_forward_pre_hook(_ClearHook(self)))
        # removes the hooks from the model once the recorder is garbage collected (holds only the
        # handle list, never the recorder)
        self._finalizer = weakref.finalize(self, _remove_handles, self._handles)

    def on_replace(self, callback: Callable[[], None] | None) -> None:
        """Call the bound method ``callback`` at the start of every forward pass with gradients
        enabled, before the previous pass's records are dropped (held weakly: it never keeps
        its owner alive). ``None`` removes it."""
        self._on_replace = None if callback is None else weakref.WeakMethod(callback)  # type: ignore[arg-type]

    @contextmanager
    def replacing(self, callback: Callable[[], None] | None) -> Iterator[None]:
        """Use ``callback`` (``None``: none) instead of the current :meth:`on_replace` callback
        inside the block (an estimator reading the forward passes of a closure, say), then
        restore it."""
        previous = self._on_replace
        self.on_replace(callback)
        try:
            yield
        finally:
            self._on_replace = previous

    def _before_replace(self) -> None:
        callback = None if self._on_replace is None else self._on_replace()
        if callback is not None:
            callback()

    def __getitem__(self, module: nn.Module) -> LayerRecord:
        return self.records[module]

    @property
    def phase_name(self) -> str:
        """The phase gradients are filed under right now."""
        return self._phase

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
        """Drop the records of every watched module (and the held outputs of the last forward)."""
        for record in self.records.values():
            record.clear()
        self._live.clear()

    def remove(self) -> None:
        """Remove every hook from the model and drop every record (the recorder is inert after)."""
        self._finalizer()
        self.clear()

    @property
    def active(self) -> bool:
        """Whether the hooks are still installed (``False`` after :meth:`remove`)."""
        return self._finalizer.alive

    def differentiate(self, value: Tensor, seed: Tensor | None = None) -> None:
        r"""Backward of ``value`` to the recorded layer outputs of the current forward only.

        Files :math:`\partial\,\mathrm{value} / \partial s` of every recorded call under the current
        phase, exactly as the tensor hooks do in an ordinary backward, but computes no parameter
        gradient (autograd prunes every weight-gradient product). The graph is retained for the
        user's own backward; the held outputs are dropped afterwards.

        Args:
            value: a scalar with a graph through the recorded outputs (the sampled loss), or,
                with ``seed``, a tensor with a graph (the model's outputs).
            seed: the gradient of the scalar in ``value`` (same shape), e.g.
                :func:`~curvkit.fisher.sampled_output_gradient`; ``None`` for a scalar ``value``.

        Raises:
            ValueError: if ``value`` is not a tensor with a graph, is not a scalar without
                ``seed``, or does not have ``seed``'s shape.
        """
        scalar = isinstance(value, Tensor) and value.numel() == 1
        if not isinstance(value, Tensor) or value.grad_fn is None or (seed is None and not scalar):
            raise ValueError(
                f"differentiate needs a scalar tensor with an autograd graph (the loss of the current "
                f"forward), or a tensor with a graph and its seed gradient, got {type(value).__name__}"
                + (f" of shape {tuple(value.shape)}" if isinstance(value, Tensor) else "")
            )
        if seed is not None and seed.shape != value.shape:
            raise ValueError(
                f"differentiate: seed of shape {tuple(seed.shape)} does not match value of shape {tuple(value.shape)}"
            )
        live, self._live = self._live, []
        if not live:
            return
        grads = torch.autograd.grad(value, [out for _, _, out in live], seed, retain_graph=True, allow_unused=True)
        phase = self._phase
        for (record, index, _), grad in zip(live, grads):
            if grad is not None:
                record.output_grads[phase][index] = grad.detach()

    # ------------------------------------------------------------------ hook bodies
    def _record_call(self, module: nn.Module, args: tuple, output: object) -> None:
        if not torch.is_grad_enabled() or not args or not isinstance(output, Tensor):
            return
        record = self.records.get(module)
        if record is None:
            return
        index = len(record.inputs)
        record.inputs.append(args[0].detach())
        if self.keep_outputs:
            record.outputs.append(output.detach())
        for grads in record.output_grads.values():
            grads.append(None)
        if output.requires_grad:
            self._live.append((record, index, output))
            output.register_hook(_GradHook(self, record, index))

    def _file_grad(self, record: LayerRecord, index: int, grad: Tensor) -> None:
        slots = record.output_grads[self._phase]
        if index < len(slots):
            slots[index] = grad.detach()
