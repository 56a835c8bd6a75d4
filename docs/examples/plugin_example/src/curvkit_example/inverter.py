r"""The ``diagonal_power`` inverter: :math:`V = (\mathrm{diag}(U) + \epsilon I)^{-p}`.

It reads only the diagonal of each factor, so it costs :math:`O(d)` instead of an
:math:`O(d^3)` eigendecomposition. For the diagonal factors of ``mode_diagonal`` it is exact; for
a full factor it is the Jacobi (diagonal) approximation of :math:`(U + \epsilon I)^{-p}`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from curvkit import Inverter, PartConfig
from curvkit.config import check_positive

__all__ = ["DiagonalPower", "DiagonalPowerConfig"]


@dataclass(frozen=True)
class DiagonalPowerConfig(PartConfig):
    """Options of :class:`DiagonalPower`.

    Attributes:
        power: the exponent :math:`p > 0`, or ``"1/2k"`` for Shampoo's root of a block with
            :math:`k` modes.
    """

    power: float | str = "1/2k"

    def __post_init__(self) -> None:
        if isinstance(self.power, str):
            if self.power != "1/2k":
                raise ValueError(f"power must be a number > 0 or '1/2k', got {self.power!r}")
        else:
            check_positive("power", self.power)


class DiagonalPower(Inverter):
    """:math:`(\\mathrm{diag}(U) + \\epsilon I)^{-p}` for a batch of factors (see the module docstring)."""

    Config = DiagonalPowerConfig

    def invert(self, matrices: Tensor, *, damping: Tensor, order: Tensor) -> Tensor:
        if self.config.power == "1/2k":
            power = 1.0 / (2.0 * order.to(matrices.dtype))
        else:
            power = torch.full(matrices.shape[:1], float(self.config.power), dtype=matrices.dtype,
                               device=matrices.device)
        diagonal = torch.diagonal(matrices, dim1=-2, dim2=-1).clamp_min(0)
        damping = damping.to(matrices.dtype)
        return torch.diag_embed((diagonal + damping[:, None]).pow(-power[:, None]))
