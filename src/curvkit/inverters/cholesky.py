r"""The ``cholesky`` inverter: :math:`(U + \epsilon I)^{-1}` through a Cholesky factorisation."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..interfaces import Inverter, PartConfig
from ..matrix_functions import damped_cholesky_inverse
from ..registry import register

__all__ = ["Cholesky"]


@dataclass(frozen=True)
class CholeskyConfig(PartConfig):
    """:class:`Cholesky` has no options (its power is always 1)."""


@register("inverter", "cholesky")
class Cholesky(Inverter):
    r""":math:`(U + \epsilon I)^{-1}` by Cholesky: cheaper than ``eigh``, power 1 only.

    A factor that is not positive definite after damping raises
    :class:`torch.linalg.LinAlgError`, which the optimizer's safeguards turn into a float64 retry,
    then more damping, then keeping the last good inverse.
    """

    Config = CholeskyConfig

    def invert(self, matrices: Tensor, *, damping: Tensor, order: Tensor) -> Tensor:
        return damped_cholesky_inverse(matrices, damping)
