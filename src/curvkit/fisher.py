r"""Targets sampled from the model's predictive distribution, for true-Fisher evidence.

The Fisher information is :math:`F = E_{x}\,E_{y \sim p(y|x,\theta)}[\nabla \log p\,\nabla \log p^\top]`:
the gradient must be taken with targets drawn from the model itself, not the data labels (which
would give the *empirical* Fisher). :func:`sampled_loss` draws one target per example (per
position, per output) and returns the negative log-likelihood whose gradient is that
sampling-based gradient; :func:`sampled_output_gradient` draws the same targets and returns
that loss's gradient in the outputs in closed form, which the optimizers backpropagate (no loss
to build and differentiate).

Supported likelihoods (``outputs`` are the model's raw outputs, batch first):

``"cross_entropy"``
    :math:`y \sim \mathrm{Categorical}(\mathrm{softmax}(z))` along the *class axis*; loss =
    cross-entropy, averaged over all positions (``reduction="mean"``) by default. The class axis
    is ``class_dim``; left at ``None`` it is read from the rank of ``outputs``:

    * ``(N, C)``: axis 1;
    * rank 3, such as a language model's ``(batch, time, vocab)`` logits or a 1-d segmentation
      net's ``(N, C, L)``: **refused** with a :class:`ValueError`, because PyTorch's
      ``(N, C, ...)`` layout and the ``(..., C)`` layout of sequence models cannot be told apart
      from the shape. Pass ``class_dim=-1`` (classes last) or ``class_dim=1`` (PyTorch's
      layout), or a flattened ``(N * T, C)`` view;
    * rank 4 and more, ``(N, C, d1, d2, ...)`` such as image segmentation: axis 1, PyTorch's
      convention. Outputs of that rank with the classes last still need ``class_dim=-1``.
``"bce_with_logits"``
    :math:`y_j \sim \mathrm{Bernoulli}(\sigma(z_j))` independently per output; loss = BCE with
    logits summed over outputs, mean over the batch (``reduction="batch_mean"``) by default, as
    in the paper's autoencoders.
``"mse"``
    :math:`y \sim \mathcal N(z, I)`; loss = :math:`\tfrac12 \|z - y\|^2` summed over outputs, mean
    over the batch by default (the Gaussian negative log-likelihood, whose Fisher is exact).
a loss object
    PyTorch's own losses stand for the likelihood they are the negative log of
    (:func:`resolve_loss`): :func:`torch.nn.functional.cross_entropy`,
    ``torch.nn.CrossEntropyLoss()``, ``torch.nn.functional.nll_loss`` and ``torch.nn.NLLLoss()``
    (outputs that are log-probabilities) mean ``"cross_entropy"``;
    :func:`torch.nn.functional.binary_cross_entropy_with_logits` and
    ``torch.nn.BCEWithLogitsLoss()`` mean ``"bce_with_logits"``; ``torch.nn.functional.mse_loss``
    and ``torch.nn.MSELoss()`` mean ``"mse"``. Only the
    likelihood is taken from the object: the sampled loss uses the named likelihood's default
    reduction (or ``reduction=``), and a module's ``weight``, ``label_smoothing`` or
    ``ignore_index`` do not enter, since the Fisher is a property of the model's predictive
    distribution, not of the training loss.
a sampler callable
    ``fn(outputs, generator) -> Tensor``: a function of your own that draws targets from the
    model's predictive distribution with ``generator`` and returns the scalar (0-d) sampled loss.

Reductions: ``"batch_mean"`` sums over every non-batch dimension and divides by the batch size;
``"mean"`` averages over all elements (all positions, for ``"cross_entropy"``); ``"sum"`` sums
everything.
"""

from __future__ import annotations

import inspect
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LOSSES", "LossSpec", "REDUCTIONS", "resolve_loss", "sample_targets", "sampled_loss", "sampled_output_gradient"]

#: The likelihoods :func:`sampled_loss` knows by name.
LOSSES = ("cross_entropy", "bce_with_logits", "mse")
#: The accepted ``reduction`` values.
REDUCTIONS = ("batch_mean", "mean", "sum")
_DEFAULT_REDUCTION = {"cross_entropy": "mean", "bce_with_logits": "batch_mean", "mse": "batch_mean"}

#: What ``loss=`` accepts: a name in :data:`LOSSES`, one of PyTorch's loss functions or modules
#: that stand for one (see :func:`resolve_loss`), or a sampler callable
#: ``(outputs, generator) -> scalar``.
LossSpec = Union[str, Callable[..., Tensor], nn.Module]

# PyTorch's loss functions and modules whose likelihood curvkit samples from
_FUNCTIONS: tuple[tuple[Callable[..., Tensor], str], ...] = (
    (F.cross_entropy, "cross_entropy"),
    (F.nll_loss, "cross_entropy"),
    (F.binary_cross_entropy_with_logits, "bce_with_logits"),
    (F.mse_loss, "mse"),
)
_MODULES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.CrossEntropyLoss, "cross_entropy"),
    (nn.NLLLoss, "cross_entropy"),
    (nn.BCEWithLogitsLoss, "bce_with_logits"),
    (nn.MSELoss, "mse"),
)
_KNOWN_OBJECTS = (
    "torch.nn.functional.cross_entropy / nll_loss / binary_cross_entropy_with_logits / mse_loss, "
    "torch.nn.CrossEntropyLoss() / NLLLoss() / BCEWithLogitsLoss() / MSELoss()"
)
_SAMPLER_SHAPE = (
    "a sampler callable must look like fn(outputs, generator) -> 0-d Tensor: it draws targets from "
    "the model's predictive distribution using `generator` (a torch.Generator) and returns the scalar "
    "loss against them; a training loss fn(outputs, target) is not one"
)
# names of a second parameter that say "this is a training loss taking the data labels"
_TARGET_NAMES = ("target", "targets", "label", "labels", "y", "y_true")


def _describe(obj: object) -> str:
    if isinstance(obj, nn.Module):
        return f"{type(obj).__module__}.{type(obj).__qualname__}()"
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    module = getattr(obj, "__module__", None)
    return f"{module}.{name}" if module else str(name)


def resolve_loss(loss: LossSpec) -> str | Callable[[Tensor, torch.Generator | None], Tensor]:
    """The likelihood behind ``loss``: a name in :data:`LOSSES`, or a sampler callable.

    Names pass through (checked); PyTorch's loss functions and modules listed in the module
    docstring map to their names; any other callable must be a sampler
    ``fn(outputs, generator) -> scalar``.

    Raises:
        ValueError: for an unknown name, for a PyTorch loss (function or module) whose
            likelihood curvkit does not sample from, and for a callable that cannot be called as
            ``fn(outputs, generator)`` or whose second parameter is named like a target
            (``target``, ``labels``, ...), i.e. a training loss rather than a sampler.
    """
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(
                f"loss must be one of {LOSSES}, a PyTorch loss standing for one ({_KNOWN_OBJECTS}) or a "
                f"sampler callable, got {loss!r}"
            )
        return loss
    for fn, name in _FUNCTIONS:
        if loss is fn:
            return name
    if isinstance(loss, nn.Module):
        for cls, name in _MODULES:
            if isinstance(loss, cls):
                return name
        raise ValueError(
            f"loss={_describe(loss)} is a module whose likelihood curvkit does not sample from; pass one of "
            f"{LOSSES}, {_KNOWN_OBJECTS}, or your own sampler ({_SAMPLER_SHAPE})"
        )
    if not callable(loss):
        raise ValueError(f"loss must be a name in {LOSSES}, a PyTorch loss or a sampler callable, got {loss!r}")
    if getattr(loss, "__module__", None) in ("torch.nn.functional", "torch._C._nn", "torch"):
        raise ValueError(
            f"loss={_describe(loss)} is a PyTorch loss function whose likelihood curvkit does not sample "
            f"from; pass one of {LOSSES}, {_KNOWN_OBJECTS}, or your own sampler ({_SAMPLER_SHAPE})"
        )
    try:
        signature = inspect.signature(loss)
    except (TypeError, ValueError):  # a builtin without a signature: judged when called
        return loss
    try:
        bound = signature.bind(object(), object())
    except TypeError:
        raise ValueError(
            f"loss={_describe(loss)} cannot be called as fn(outputs, generator) (its signature is "
            f"{signature}); {_SAMPLER_SHAPE}"
        ) from None
    second = list(bound.arguments)[1:2]  # the parameter the generator would be bound to
    if second and second[0].lower() in _TARGET_NAMES:
        raise ValueError(
            f"loss={_describe(loss)} takes ({', '.join(signature.parameters)}), which looks like a training "
            f"loss against data labels; {_SAMPLER_SHAPE}. For cross-entropy, BCE with logits or squared "
            f"error pass the name ({', '.join(LOSSES)}) instead"
        )
    return loss


def _class_axis(outputs: Tensor, class_dim: int | None) -> int:
    """The non-negative class axis of cross-entropy ``outputs`` (see the module docstring)."""
    rank = outputs.dim()
    shape = tuple(outputs.shape)
    if rank < 2:
        raise ValueError(
            f"cross_entropy needs outputs with a batch axis and a class axis, (N, C) or (N, ..., C), got "
            f"shape {shape}"
        )
    if class_dim is None:
        if rank == 3:
            raise ValueError(
                f"cross_entropy got outputs of shape {shape} and cannot tell which axis holds the classes: "
                f"(batch, time, vocab) logits of a sequence model have them last, PyTorch's (N, C, L) layout "
                f"second. Say which: loss='cross_entropy', class_dim=-1 for (batch, ..., classes), "
                f"class_dim=1 for (N, C, L); or pass a flattened (N*T, C) view, "
                f"outputs.reshape(-1, outputs.shape[-1])"
            )
        return 1
    if not isinstance(class_dim, int) or isinstance(class_dim, bool):
        raise ValueError(f"class_dim must be an int (an axis of outputs) or None, got {class_dim!r}")
    if not -rank <= class_dim < rank:
        raise ValueError(
            f"class_dim={class_dim} is out of range for outputs of shape {shape} (rank {rank}); use an axis "
            f"in [{-rank}, {rank - 1}], for example -1 for classes last"
        )
    axis = class_dim % rank
    if axis == 0:
        raise ValueError(
            f"class_dim={class_dim} names the batch axis of outputs of shape {shape}; outputs are batch first, "
            f"so the classes are on another axis (class_dim=-1 for classes last, 1 for PyTorch's (N, C, ...))"
        )
    return axis


def sample_targets(
    outputs: Tensor,
    loss: LossSpec,
    *,
    generator: torch.Generator | None = None,
    class_dim: int | None = None,
) -> Tensor:
    """Draw one target per example (per position for cross-entropy, per output for BCE/MSE) from
    the model's predictive distribution.

    Runs without gradient; the result has no autograd history. Cross-entropy targets are class
    indices of shape ``outputs.shape`` without the class axis (``class_dim``, see the module
    docstring); BCE and MSE targets have the shape of ``outputs``.

    Raises:
        ValueError: for an unknown likelihood, a sampler callable (it samples itself), an
            ambiguous or invalid class axis, or ``class_dim`` with a likelihood other than
            ``"cross_entropy"``.
    """
    name = resolve_loss(loss)
    if not isinstance(name, str):
        raise ValueError("sample_targets needs a named likelihood; a sampler callable draws its own targets")
    _check_class_dim(name, class_dim)
    return _draw(outputs, name, generator=generator, class_dim=class_dim)[0]


def _draw(outputs: Tensor, name: str, *, generator: torch.Generator | None, class_dim: int | None) -> tuple[Tensor, Tensor | None]:
    """``(targets, probabilities)``: the sampled targets (see :func:`sample_targets`) and, for
    ``"cross_entropy"`` and ``"bce_with_logits"``, the model's probabilities in float32 or wider
    (non-finite where the outputs are: the draw still gives valid targets there), class axis
    where the outputs have it."""
    with torch.no_grad():
        z = outputs.detach()
        wide = z if z.dtype in (torch.float32, torch.float64) else z.float()
        if name == "cross_entropy":
            axis = _class_axis(z, class_dim)
            probs = torch.softmax(wide, dim=axis)
            # non-finite outputs (a diverging model) still sample; their loss and gradient are
            # non-finite and the optimizer's evidence check then skips them
            moved = torch.nan_to_num(probs, nan=1.0 / z.shape[axis]).movedim(axis, -1)
            idx = torch.multinomial(moved.reshape(-1, z.shape[axis]), 1, generator=generator).squeeze(-1)
            return idx.reshape(moved.shape[:-1]), probs
        if name == "bce_with_logits":
            probs, u = _bernoulli_draw(z, generator)
            return (u < probs).to(z.dtype), probs
        noise = torch.randn(z.shape, generator=generator, dtype=torch.float32, device=z.device)
        return (z.float() + noise).to(z.dtype), None


def _bernoulli_draw(outputs: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    r"""``(p, u)``: the probabilities :math:`\sigma(z)` of BCE-with-logits outputs in float32 or wider
    and uniform draws :math:`u \sim U[0, 1)` of their shape; the target is :math:`y = [u < p]`, a
    Bernoulli(:math:`p`) draw (faster than ``torch.bernoulli`` on the CPU). A NaN :math:`p` compares
    ``False`` and draws 0, a valid target for evidence the finiteness check then skips. Both
    tensors are fresh (the caller may overwrite them)."""
    z = outputs.detach()
    probs = torch.sigmoid(z if z.dtype in (torch.float32, torch.float64) else z.float())
    return probs, torch.rand(probs.shape, generator=generator, dtype=probs.dtype, device=probs.device)


def sampled_output_gradient(
    outputs: Tensor,
    loss: LossSpec,
    *,
    reduction: str | None = None,
    generator: torch.Generator | None = None,
    class_dim: int | None = None,
) -> Tensor | None:
    r"""The gradient of :func:`sampled_loss` with respect to ``outputs``, in closed form.

    For the named likelihoods the derivative of the negative log-likelihood in the raw outputs
    :math:`z` is known: :math:`\mathrm{softmax}(z) - e_y` (cross-entropy, along the class axis),
    :math:`\sigma(z) - y` (BCE with logits) and :math:`z - y` (squared error), times the
    reduction's scale (``1/N`` for ``"batch_mean"``, one over the number of loss terms for
    ``"mean"``, 1 for ``"sum"``). Backpropagating it,
    ``torch.autograd.grad(outputs, params, grad_outputs=...)``, gives the sampled gradient of
    :func:`sampled_loss` without building and differentiating the loss (a forward and a
    backward node fewer per step). Draws the same targets as :func:`sampled_loss` from the same
    ``generator`` state. Non-finite outputs give a non-finite gradient, as the loss would.

    Args:
        outputs: raw model outputs, batch first (see :func:`sampled_loss`).
        loss: as for :func:`sampled_loss`.
        reduction: as for :func:`sampled_loss`.
        generator: random generator for the draws.
        class_dim: the class axis of cross-entropy outputs (see :func:`sampled_loss`).

    Returns:
        A tensor of the shape and dtype of ``outputs`` without autograd history, or ``None`` for
        a sampler callable (which defines its own loss: differentiate :func:`sampled_loss`).

    Raises:
        ValueError: as :func:`sampled_loss`.
    """
    name = resolve_loss(loss)
    if not isinstance(name, str):
        _check_sampler_options(reduction, class_dim)
        return None
    reduction = _check_reduction(name, reduction, outputs)
    _check_class_dim(name, class_dim)
    with torch.no_grad():
        if name == "bce_with_logits":  # sigma(z) - [u < sigma(z)], in place on the draw's own tensors
            grad, draws = _bernoulli_draw(outputs, generator)
            grad.sub_(draws.lt_(grad))  # u < p as 1.0 / 0.0 in u's dtype: sigma(z) - y
            terms = outputs.numel()
        else:
            target, probs = _draw(outputs, name, generator=generator, class_dim=class_dim)
            if name == "cross_entropy":
                axis = _class_axis(outputs, class_dim)
                assert probs is not None
                index = target.unsqueeze(axis)
                grad = probs.scatter_add_(axis, index, probs.new_full(index.shape, -1.0))  # softmax: ours
                terms = outputs.numel() // outputs.shape[axis]
            else:
                grad = outputs.detach() - target
                terms = outputs.numel()
        scale = {"batch_mean": 1.0 / outputs.shape[0], "mean": 1.0 / max(terms, 1), "sum": 1.0}[reduction]
        if scale != 1.0:
            grad.mul_(scale)  # a fresh buffer of this call
        return grad.to(outputs.dtype)


def _check_sampler_options(reduction: str | None, class_dim: int | None) -> None:
    if reduction is not None or class_dim is not None:
        raise ValueError(
            "reduction= and class_dim= apply to the named likelihoods; a sampler callable reduces "
            "its own loss (leave them unset)"
        )


def _check_class_dim(name: str, class_dim: int | None) -> None:
    if class_dim is not None and name != "cross_entropy":
        raise ValueError(
            f"class_dim={class_dim!r} applies to loss='cross_entropy' only; {name!r} samples every output "
            f"independently (leave class_dim unset)"
        )


def _check_reduction(name: str, reduction: str | None, outputs: Tensor) -> str:
    reduction = _DEFAULT_REDUCTION[name] if reduction is None else reduction
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if outputs.dim() == 0:
        raise ValueError("outputs must have a batch dimension, got a 0-d tensor")
    return reduction


def _reduce(per_element: Tensor, reduction: str, batch: int) -> Tensor:
    if reduction == "batch_mean":
        return per_element.sum() / batch
    if reduction == "mean":
        return per_element.mean()
    if reduction == "sum":
        return per_element.sum()
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def sampled_loss(
    outputs: Tensor,
    loss: LossSpec,
    *,
    reduction: str | None = None,
    generator: torch.Generator | None = None,
    class_dim: int | None = None,
) -> Tensor:
    """The loss of ``outputs`` against targets sampled from the model (differentiable in outputs).

    Args:
        outputs: raw model outputs (logits, or predictions for ``"mse"``), batch first.
        loss: ``"cross_entropy"``, ``"bce_with_logits"``, ``"mse"``, a PyTorch loss function or
            module standing for one (see :func:`resolve_loss`), or a sampler callable
            ``(outputs, generator) -> scalar``.
        reduction: ``"batch_mean"``, ``"mean"`` or ``"sum"``; ``None`` takes the loss's default.
        generator: random generator for the draws (the optimizer passes its own, which it saves).
        class_dim: the class axis of cross-entropy outputs: ``-1`` for ``(batch, ..., classes)``
            such as language-model logits ``(batch, time, vocab)``, ``1`` for PyTorch's
            ``(N, C, ...)``; ``None`` reads it from the rank (``(N, C)`` and rank >= 4: axis 1;
            rank 3: refused as ambiguous). Only for ``"cross_entropy"``.

    Raises:
        ValueError: for an unknown likelihood or reduction, an ambiguous or invalid class axis, a
            0-d ``outputs``, or a sampler callable that does not return a 0-d tensor (or fails
            when called as ``fn(outputs, generator)``).
    """
    name = resolve_loss(loss)
    if not isinstance(name, str):
        _check_sampler_options(reduction, class_dim)
        try:
            value = name(outputs, generator)
        except TypeError as exc:
            raise ValueError(f"calling loss={_describe(name)}(outputs, generator) failed ({exc}); {_SAMPLER_SHAPE}") from exc
        if not isinstance(value, Tensor) or value.dim() != 0:
            raise ValueError(f"a sampler callable must return a scalar (0-d) tensor; {_SAMPLER_SHAPE}")
        return value
    reduction = _check_reduction(name, reduction, outputs)
    target = sample_targets(outputs, name, generator=generator, class_dim=class_dim)
    batch = outputs.shape[0]
    if name == "cross_entropy":
        axis = _class_axis(outputs, class_dim)
        per = F.cross_entropy(outputs.movedim(axis, 1), target, reduction="none")
    elif name == "bce_with_logits":
        per = F.binary_cross_entropy_with_logits(outputs, target, reduction="none")
    else:
        per = 0.5 * (outputs - target).pow(2)
    return _reduce(per, reduction, batch)
