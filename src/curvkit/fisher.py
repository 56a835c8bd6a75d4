r"""Targets sampled from the model's predictive distribution, for true-Fisher evidence.

The Fisher information is :math:`F = E_{x}\,E_{y \sim p(y|x,\theta)}[\nabla \log p\,\nabla \log p^\top]`:
the gradient must be taken with targets drawn from the model itself, not the data labels (which
would give the *empirical* Fisher). :func:`sampled_loss` draws one target per example and returns
the batch-mean negative log-likelihood whose gradient is that sampling-based gradient.

Supported likelihoods (``outputs`` are the model's raw outputs, batch first):

``"cross_entropy"``
    :math:`y \sim \mathrm{Categorical}(\mathrm{softmax}(z))` along dim 1 (shape ``(N, C, ...)``);
    loss = cross-entropy, averaged over all positions (``reduction="mean"``) by default.
``"bce_with_logits"``
    :math:`y_j \sim \mathrm{Bernoulli}(\sigma(z_j))` independently per output; loss = BCE with
    logits summed over outputs, mean over the batch (``reduction="batch_mean"``) by default, as
    in the paper's autoencoders.
``"mse"``
    :math:`y \sim \mathcal N(z, I)`; loss = :math:`\tfrac12 \|z - y\|^2` summed over outputs, mean
    over the batch by default (the Gaussian negative log-likelihood, whose Fisher is exact).
a callable
    ``loss(outputs, generator) -> Tensor`` that samples and returns the scalar sampled loss itself.

Reductions: ``"batch_mean"`` sums over every non-batch dimension and divides by the batch size;
``"mean"`` averages over all elements; ``"sum"`` sums everything.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LOSSES", "LossSpec", "REDUCTIONS", "sample_targets", "sampled_loss"]

#: The likelihoods :func:`sampled_loss` knows by name.
LOSSES = ("cross_entropy", "bce_with_logits", "mse")
#: The accepted ``reduction`` values.
REDUCTIONS = ("batch_mean", "mean", "sum")
_DEFAULT_REDUCTION = {"cross_entropy": "mean", "bce_with_logits": "batch_mean", "mse": "batch_mean"}

#: What ``loss=`` accepts, a name in :data:`LOSSES` or a callable ``(outputs, generator) -> scalar``.
LossSpec = Union[str, Callable[[Tensor, torch.Generator], Tensor]]


def sample_targets(outputs: Tensor, loss: str, *, generator: torch.Generator | None = None) -> Tensor:
    """Draw one target per example (per output for BCE/MSE) from the predictive distribution.

    Runs without gradient; the result has no autograd history.
    """
    with torch.no_grad():
        z = outputs.detach()
        if loss == "cross_entropy":
            if z.dim() < 2:
                raise ValueError(
                    f"cross_entropy needs outputs of shape (N, C, ...), got shape {tuple(z.shape)}"
                )
            # non-finite outputs (a diverging model) still sample; their loss and gradient are
            # non-finite and the optimizer's evidence check then skips them
            logits = torch.nan_to_num(z.float(), nan=0.0).movedim(1, -1).reshape(-1, z.shape[1])
            probs = torch.softmax(logits, dim=-1)
            idx = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            shape = (z.shape[0],) + tuple(z.shape[2:])
            return idx.reshape(shape)
        if loss == "bce_with_logits":
            probs = torch.sigmoid(z.float()).nan_to_num(0.5)
            return torch.bernoulli(probs, generator=generator).to(z.dtype)
        if loss == "mse":
            noise = torch.randn(z.shape, generator=generator, dtype=torch.float32, device=z.device)
            return (z.float() + noise).to(z.dtype)
    raise ValueError(f"loss must be one of {LOSSES} or a callable, got {loss!r}")


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
) -> Tensor:
    """The loss of ``outputs`` against targets sampled from the model (differentiable in outputs).

    Args:
        outputs: raw model outputs (logits, or predictions for ``"mse"``), batch first.
        loss: ``"cross_entropy"``, ``"bce_with_logits"``, ``"mse"`` or a callable
            ``(outputs, generator) -> scalar``.
        reduction: ``"batch_mean"``, ``"mean"`` or ``"sum"``; ``None`` takes the loss's default.
        generator: random generator for the draws (the optimizer passes its own, which it saves).
    """
    if callable(loss):
        value = loss(outputs, generator)
        if not isinstance(value, Tensor) or value.dim() != 0:
            raise ValueError("a callable loss must return a scalar (0-d) tensor")
        return value
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES} or a callable, got {loss!r}")
    reduction = _DEFAULT_REDUCTION[loss] if reduction is None else reduction
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if outputs.dim() == 0:
        raise ValueError("outputs must have a batch dimension, got a 0-d tensor")
    target = sample_targets(outputs, loss, generator=generator)
    batch = outputs.shape[0]
    if loss == "cross_entropy":
        per = F.cross_entropy(outputs, target, reduction="none")
    elif loss == "bce_with_logits":
        per = F.binary_cross_entropy_with_logits(outputs, target, reduction="none")
    else:
        per = 0.5 * (outputs - target).pow(2)
    return _reduce(per, reduction, batch)
