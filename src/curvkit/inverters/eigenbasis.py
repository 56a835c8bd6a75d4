r"""The ``eigenbasis`` inverter: each factor as its eigenbasis and damped, powered eigenvalues.

For a factor :math:`U = Q \Lambda Q^\top` it returns ``(Q, (max(Λ, 0) + ε)^{-p})``; the optimizer
wraps each pair as an :class:`~curvkit.operators.EigenBasis` with a per-block version that grows at
every refresh. Eigenbasis methods (SOAP, Vyas et al. 2024, arXiv 2409.11321; EKFAC, George et
al. 2018, arXiv 1806.03884) work in the coordinates :math:`Q^\top (\cdot)\, Q` and replace the
eigenvalues by their own per-coordinate scaling; ``kronecker_mode`` applies the pair as the matrix
:math:`Q\,\mathrm{diag}(\lambda)\,Q^\top`, which equals ``damped_eigen``'s result.

Eigenvalues come in ascending order and each eigenvector's sign is fixed (largest-magnitude
entry positive), so bases of nearby factors are comparable column by column across refreshes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..interfaces import Inverter, PartConfig
from ..matrix_functions import symmetrize
from ..operators import EigenBasis
from ..registry import register
from .eigen import _parse_power

__all__ = ["Eigenbasis", "EigenbasisConfig"]

# the optimizer keeps EigenBasis entries in its state: let torch.load(weights_only=True) read them
torch.serialization.add_safe_globals([EigenBasis])


@dataclass(frozen=True)
class EigenbasisConfig(PartConfig):
    """Options of :class:`Eigenbasis`.

    Attributes:
        power: the exponent ``p`` of the returned eigenvalues :math:`(\\lambda + \\epsilon)^{-p}`
            (a number > 0, or ``"1/2k"`` / ``"1/k"`` as for ``damped_eigen``).
    """

    power: float | str = 1.0

    def __post_init__(self) -> None:
        _parse_power(self.power)


@register("inverter", "eigenbasis")
class Eigenbasis(Inverter):
    r"""One ``eigh`` per factor: ``(vectors, values)`` with
    :math:`U = Q \Lambda Q^\top`, values :math:`(\max(\Lambda, 0) + \epsilon)^{-p}`.

    Returns a pair of ``(b, d, d)`` and ``(b, d)`` tensors (``produces = "eigenbasis"``).
    """

    Config = EigenbasisConfig
    produces = "eigenbasis"

    def invert(self, matrices: Tensor, *, damping: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        constant, denom = _parse_power(self.config.power)
        vals, vecs = torch.linalg.eigh(symmetrize(matrices))
        # a deterministic sign per eigenvector: its largest-magnitude entry is positive
        idx = vecs.abs().argmax(dim=-2, keepdim=True)
        sign = torch.where(torch.gather(vecs, -2, idx) < 0, -1.0, 1.0).to(vecs.dtype)
        vecs = vecs * sign
        if denom:
            power = 1.0 / (denom * order.to(matrices.dtype))
        else:
            power = torch.full((matrices.shape[0],), constant, dtype=matrices.dtype, device=matrices.device)
        damping = damping.to(vals.dtype)
        values = (vals.clamp_min(0) + damping[:, None]).pow(-power[:, None])
        return vecs, values
