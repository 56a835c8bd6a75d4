r"""Shared pieces of the conformance checks: the default problem, the training loop, assertions.

The default problem is a tiny classifier on random ``(N, 2, 5, 5)`` inputs with three classes::

    Conv2d(2, 3, 3) -> ReLU -> Flatten -> Linear(27, 6) -> LayerNorm(6) -> ReLU -> Linear(6, 3)

so its parameters cover views of rank 1 (biases, norm scales), 2 (linear weights) and 3 (the
convolution weight, ``(3, 2, 9)``), and it holds a layer (``LayerNorm``) that layer-based
estimators do not factor and must still cover.
"""

from __future__ import annotations

import io
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ConformanceError",
    "Problem",
    "assert_finite",
    "assert_symmetric_psd",
    "default_data",
    "default_model",
    "fail",
    "random_psd",
    "roundtrip",
    "train_step",
    "true_label_loss",
]

#: ``make_model() -> nn.Module``
ModelFactory = Callable[[], nn.Module]
#: ``make_data(generator, batch_size) -> (inputs, targets)``
DataFactory = Callable[[torch.Generator, int], tuple[Tensor, Tensor]]


class ConformanceError(AssertionError):
    """A part or preset broke the contract a conformance check verifies."""


def fail(who: str, message: str) -> None:
    """Raise :class:`ConformanceError` with the part name in front of the message."""
    raise ConformanceError(f"{who}: {message}")


def default_model() -> nn.Module:
    """The default tiny model (see the module docstring)."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(27, 6),
        nn.LayerNorm(6),
        nn.ReLU(),
        nn.Linear(6, 3),
    )


def default_data(generator: torch.Generator, batch_size: int) -> tuple[Tensor, Tensor]:
    """Random inputs for :func:`default_model` and random labels in ``{0, 1, 2}``."""
    x = torch.randn(batch_size, 2, 5, 5, generator=generator)
    y = torch.randint(0, 3, (batch_size,), generator=generator)
    return x, y


class Problem:
    """A model factory, a data factory and the loss that links them.

    Args:
        make_model: builds a fresh model (random initialisation is fine: checks copy weights).
        make_data: ``(generator, batch_size) -> (inputs, targets)``.
        loss: the likelihood name of :mod:`curvkit.fisher` (``"cross_entropy"``,
            ``"bce_with_logits"`` or ``"mse"``); the true-label loss uses the same reduction as
            the sampled one.
        dtype: floating dtype of the model and inputs.
    """

    def __init__(
        self,
        make_model: ModelFactory | None = None,
        make_data: DataFactory | None = None,
        *,
        loss: str = "cross_entropy",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if loss not in ("cross_entropy", "bce_with_logits", "mse"):
            raise ValueError(f"loss must be 'cross_entropy', 'bce_with_logits' or 'mse', got {loss!r}")
        self.make_model = make_model or default_model
        self.make_data = make_data or default_data
        self.loss = loss
        self.dtype = dtype

    def model(self) -> nn.Module:
        return self.make_model().to(self.dtype)

    def batch(self, seed: int, batch_size: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(seed)
        x, y = self.make_data(gen, batch_size)
        x = x.to(self.dtype)
        if y.is_floating_point():
            y = y.to(self.dtype)
        return x, y


def true_label_loss(outputs: Tensor, targets: Tensor, loss: str) -> Tensor:
    """The ordinary (true-label) loss matching the likelihood ``loss`` and its default reduction."""
    n = outputs.shape[0]
    if loss == "cross_entropy":
        return F.cross_entropy(outputs, targets)
    if loss == "bce_with_logits":
        return F.binary_cross_entropy_with_logits(outputs, targets, reduction="sum") / n
    return 0.5 * (outputs - targets).pow(2).sum() / n


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, loss: str) -> Tensor:
    """One step of the loop every curvkit method shares (returns the detached loss).

    ``update_curvature`` is called whenever the optimizer has it (it is a no-op for minibatch
    evidence), and ``step`` gets a closure when the optimizer says it needs one.
    """
    out = model(x)
    value = true_label_loss(out, y, loss)
    opt.zero_grad()
    if hasattr(opt, "update_curvature"):
        opt.update_curvature(out, loss=loss)
    value.backward()
    if getattr(opt, "needs_closure", False):

        def closure() -> Tensor:
            opt.zero_grad()
            v = true_label_loss(model(x), y, loss)
            v.backward()
            return v

        opt.step(closure)
    else:
        opt.step()
    return value.detach()


def roundtrip(obj: Any) -> Any:
    """``torch.save`` to memory and back with ``torch.load(weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def random_psd(d: int, *, rank: int | None = None, scale: float = 1.0, dtype: torch.dtype = torch.float64,
               generator: torch.Generator | None = None) -> Tensor:
    r"""A random symmetric PSD ``d x d`` matrix :math:`s X X^\top / r` of rank ``r`` (default ``d``)."""
    r = d if rank is None else rank
    x = torch.randn(d, max(r, 1), dtype=torch.float64, generator=generator)
    if r == 0:
        x = torch.zeros_like(x)
    return (scale * x @ x.T / max(r, 1)).to(dtype)


def assert_finite(who: str, what: str, tensor: Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        fail(who, f"{what} is not finite (NaN or Inf): {tensor}")


def assert_symmetric_psd(who: str, what: str, matrix: Tensor, *, rtol: float) -> None:
    """Symmetric to ``rtol`` and eigenvalues no lower than ``-rtol * max|eigenvalue|``."""
    assert_finite(who, what, matrix)
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        fail(who, f"{what} must be a square matrix, got shape {tuple(matrix.shape)}")
    m = matrix.detach().to(torch.float64)
    scale = float(m.abs().max()) if m.numel() else 0.0
    asym = float((m - m.T).abs().max()) if m.numel() else 0.0
    if asym > rtol * max(scale, 1e-300):
        fail(who, f"{what} is not symmetric: max |A - A^T| = {asym:.3e} (max |A| = {scale:.3e})")
    eig = torch.linalg.eigvalsh(0.5 * (m + m.T))
    if m.numel() and float(eig.min()) < -rtol * max(float(eig.abs().max()), 1e-300):
        fail(who, f"{what} is not positive semi-definite: smallest eigenvalue {float(eig.min()):.3e}, "
                  f"largest {float(eig.max()):.3e}")
