r"""The ``damped_eigen`` inverter: :math:`(U + \epsilon I)^{-p}` through one ``eigh``."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import check_positive
from ..interfaces import Inverter, PartConfig
from ..config import check_choice
from ..matrix_functions import damped_eigen_power, damped_inverse
from ..registry import register

__all__ = ["DampedEigen", "DampedEigenConfig"]

_ROOT = re.compile(r"^1/\(?(\d*)k\)?$")


def _parse_power(power: float | str) -> tuple[float, float]:
    """``power`` as ``(constant, per_order_denominator)``: p = constant, or p = 1/(c k)."""
    if isinstance(power, str):
        match = _ROOT.match(power.replace(" ", ""))
        if not match:
            raise ValueError(
                f"power must be a number > 0 or a root of the block order such as '1/2k' or '1/k', "
                f"got {power!r}"
            )
        return 0.0, float(match.group(1) or 1)
    check_positive("power", power)
    return float(power), 0.0


@dataclass(frozen=True)
class DampedEigenConfig(PartConfig):
    """Options of :class:`DampedEigen`.

    Attributes:
        power: the exponent ``p`` (a number > 0), or ``"1/2k"`` / ``"1/k"`` for a root that depends
            on the number of modes ``k`` of the block (Shampoo uses ``"1/2k"``).
        relative_damping: damping relative to the largest eigenvalue of each factor.
        method: ``"auto"`` (a batched Cholesky inverse where the power is 1 with absolute
            damping -- the same matrix, several times cheaper and free of ``eigh``'s convergence
            failures on rank-deficient factors -- otherwise ``eigh``), ``"eigh"`` or
            ``"cholesky"`` (power 1 only).
    """

    power: float | str = 1.0
    relative_damping: bool = False
    method: str = "auto"

    def __post_init__(self) -> None:
        _parse_power(self.power)
        check_choice("method", self.method, ("auto", "eigh", "cholesky"))
        if self.method == "cholesky" and (_parse_power(self.power) != (1.0, 0.0) or self.relative_damping):
            raise ValueError(
                f"method='cholesky' computes (U + eps I)^-1 only: it needs power=1 and "
                f"relative_damping=False, got power={self.power!r}, relative_damping={self.relative_damping!r}"
            )
        if not isinstance(self.relative_damping, bool):
            raise ValueError(f"relative_damping must be a bool, got {self.relative_damping!r}")


@register("inverter", "damped_eigen")
class DampedEigen(Inverter):
    r"""Matrix power :math:`V = (U + \epsilon I)^{-p}` of each factor through one eigendecomposition.

    ``p = 1`` is TNT's and KFAC's inverse; ``p = 1/(2k)`` (``power="1/2k"``) is Shampoo's root for a
    block with ``k`` modes. Eigenvalues are clipped at zero before damping, so a PSD factor with
    rounding noise still yields a finite, SPD result.

    Cost per ``d x d`` factor: one ``eigh`` (about :math:`9 d^3` flops, poorly parallel), or for
    ``p = 1`` with absolute damping (TNT, KFAC) a Cholesky factorisation and inverse (about
    :math:`d^3` flops), batched over same-size factors either way.
    """

    Config = DampedEigenConfig
    state_neutral_options = ("method",)

    def invert(self, matrices: Tensor, *, damping: Tensor, order: Tensor) -> Tensor:
        constant, denom = _parse_power(self.config.power)
        use_cholesky = self.config.method == "cholesky" or (
            self.config.method == "auto" and denom == 0.0 and constant == 1.0 and not self.config.relative_damping
        )
        if use_cholesky:
            return damped_inverse(matrices, damping)
        if denom:
            power = 1.0 / (denom * order.to(matrices.dtype))
        else:
            power = torch.full((matrices.shape[0],), constant, dtype=matrices.dtype, device=matrices.device)
        return damped_eigen_power(matrices, damping, power, relative=self.config.relative_damping)
