"""The ``identity`` inverter: passes factors through unchanged.

For estimators that maintain inverse factors directly (K-BFGS's quasi-Newton factors), so the
"inversion" step has nothing left to do.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..interfaces import Inverter, PartConfig
from ..registry import register

__all__ = ["IdentityInverter"]


@dataclass(frozen=True)
class IdentityInverterConfig(PartConfig):
    """:class:`IdentityInverter` has no options."""


@register("inverter", "identity")
class IdentityInverter(Inverter):
    """Returns the factors as they are (damping is ignored: the estimator already applied it)."""

    Config = IdentityInverterConfig

    def invert(self, matrices: Tensor, *, damping: Tensor, order: Tensor) -> Tensor:
        return matrices.clone()
