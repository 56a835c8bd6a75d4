r"""Inverse operators: per-mode preconditioning matrices that are not stored densely.

An inverter (or an estimator that maintains inverse factors directly, such as K-BFGS) hands the
preconditioner one entry per tensor mode. An entry is either a dense ``(d, d)`` :class:`~torch.Tensor`
(the common case) or an :class:`InverseOperator`:

* :class:`EigenBasis` -- :math:`V = Q\,\mathrm{diag}(\lambda)\,Q^\top` kept as its eigenbasis, so
  eigenbasis methods (SOAP, EKFAC) can work in the rotated coordinates;
* limited-memory operators (for example K-BFGS(L)'s L-BFGS pairs applied by two-loop recursion),
  defined by the plugins that need them.

:func:`curvkit.contractions.mode_products` applies dense entries and operators alike, so the
``kronecker_mode`` preconditioner accepts both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["EigenBasis", "InverseOperator", "apply_on_mode"]


def apply_on_mode(tensor: Tensor, mode: int, fn) -> Tensor:
    """Apply ``fn`` (``(d, n) -> (d, n)``) to the mode-``mode`` unfolding of ``tensor``, fold back."""
    moved = tensor.movedim(mode, 0)
    out = fn(moved.reshape(moved.shape[0], -1))
    return out.reshape(moved.shape).movedim(0, mode)


class InverseOperator(ABC):
    """A symmetric ``(d, d)`` preconditioning operator on one tensor mode."""

    @property
    @abstractmethod
    def size(self) -> int:
        """The dimension ``d`` of the mode it acts on."""

    @abstractmethod
    def matmul(self, matrix: Tensor) -> Tensor:
        """``V @ matrix`` for a ``(d, n)`` matrix."""

    def mode_product(self, tensor: Tensor, mode: int) -> Tensor:
        r""":math:`T \times_{mode} V` (multiply mode ``mode`` of ``tensor`` from the left)."""
        return apply_on_mode(tensor, mode, self.matmul)

    def to_dense(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> Tensor:
        """The operator as a dense matrix (for tests and inspection; costs d matvecs)."""
        eye = torch.eye(self.size, dtype=dtype or torch.float32, device=device)
        return self.matmul(eye)


@dataclass
class EigenBasis(InverseOperator):
    r""":math:`V = Q\,\mathrm{diag}(\lambda)\,Q^\top` with orthonormal columns ``vectors`` = Q.

    Attributes:
        vectors: ``(d, d)`` orthonormal eigenvectors Q (columns).
        values: ``(d,)`` the operator's eigenvalues :math:`\lambda` (already the transformed
            values, e.g. :math:`(\mu + \epsilon)^{-p}`).
        version: how many times this block's basis has been computed (lets a preconditioner
            that keeps state in the basis notice a refresh).
    """

    vectors: Tensor
    values: Tensor
    version: int = 0

    @property
    def size(self) -> int:
        return int(self.vectors.shape[-1])

    def matmul(self, matrix: Tensor) -> Tensor:
        q = self.vectors.to(matrix.dtype)
        return q @ (self.values.to(matrix.dtype)[:, None] * (q.T @ matrix))
