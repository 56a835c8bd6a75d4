r"""The ``eigenbasis`` inverter: each factor as its eigenbasis and damped, powered eigenvalues.

For a factor :math:`U = Q \Lambda Q^\top` it returns ``(Q, (max(Λ, 0) + ε)^{-p})``; the optimizer
wraps each pair as an :class:`~curvkit.operators.EigenBasis` with a per-block version that grows at
every refresh. Eigenbasis methods (SOAP, Vyas et al. 2024, arXiv 2409.11321; EKFAC, George et
al. 2018, arXiv 1806.03884) work in the coordinates :math:`Q^\top (\cdot)\, Q` and replace the
eigenvalues by their own per-coordinate scaling; ``kronecker_mode`` applies the pair as the matrix
:math:`Q\,\mathrm{diag}(\lambda)\,Q^\top`, which equals ``damped_eigen``'s result.

Eigenvalues come in ascending order and each eigenvector's sign is fixed (largest-magnitude
entry positive), so bases of nearby factors are comparable column by column across refreshes.

``refresh="qr"`` is SOAP's warm-started refresh (Vyas et al. 2024, arXiv 2409.11321: the
eigenvector update by one power iteration and a QR decomposition, as in the authors' code): the
first basis of a factor comes from ``eigh``; every later one from one step of
power iteration on the previous basis :math:`Q` (the optimizer passes it as ``previous``):

.. math::
    \hat\mu = \operatorname{diag}(Q^\top U Q), \quad \pi = \operatorname{argsort}(\hat\mu)
    \text{ descending}, \quad Q' R = U\, Q_{:, \pi} \text{ (QR, } \operatorname{diag} R \ge 0),
    \quad Q^{\text{new}}_{:, \pi} = Q',

i.e. the columns are orthogonalised in order of decreasing estimated eigenvalue (as subspace
iteration needs) and then put back where they were, so column :math:`j` of the new basis is the
refined column :math:`j` of the old one. The authors permute the columns *and* Adam's second
moment by :math:`\pi` instead; keeping the positions is the same update without touching the
preconditioner's state. The returned values are :math:`(\max(\hat\mu', 0) + \epsilon)^{-p}`
with :math:`\hat\mu' = \operatorname{diag}(Q^{\text{new}\top} U Q^{\text{new}})`, so the basis
is an approximate eigenbasis and the order is no longer ascending. Cost: two ``(d, d)`` matrix
products (the power step and the new values) and one QR, instead of one ``eigh``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import check_choice
from ..interfaces import Inverter, PartConfig
from ..matrix_functions import shifted_eigh, symmetrize
from ..operators import EigenBasis
from ..registry import register
from .eigen import _parse_power

__all__ = ["Eigenbasis", "EigenbasisConfig", "qr_refresh"]

# the optimizer keeps EigenBasis entries in its state: let torch.load(weights_only=True) read them
torch.serialization.add_safe_globals([EigenBasis])


@dataclass(frozen=True)
class EigenbasisConfig(PartConfig):
    """Options of :class:`Eigenbasis`.

    Attributes:
        power: the exponent ``p`` of the returned eigenvalues :math:`(\\lambda + \\epsilon)^{-p}`
            (a number > 0, or ``"1/2k"`` / ``"1/k"`` as for ``damped_eigen``).
        refresh: ``"eigh"`` (a full eigendecomposition at every refresh) or ``"qr"`` (SOAP's
            warm-started QR power step from the previous basis; the first refresh is ``eigh``).
    """

    power: float | str = 1.0
    refresh: str = "eigh"

    def __post_init__(self) -> None:
        _parse_power(self.power)
        check_choice("refresh", self.refresh, ("eigh", "qr"))


@register("inverter", "eigenbasis")
class Eigenbasis(Inverter):
    r"""One ``eigh`` per factor: ``(vectors, values)`` with
    :math:`U = Q \Lambda Q^\top`, values :math:`(\max(\Lambda, 0) + \epsilon)^{-p}`; with
    ``refresh="qr"`` a warm-started QR power step from the previous basis after the first
    refresh (module docstring).

    Returns a pair of ``(b, d, d)`` and ``(b, d)`` tensors (``produces = "eigenbasis"``).
    """

    Config = EigenbasisConfig
    produces = "eigenbasis"
    warm_start = True

    def invert(  # type: ignore[override]
        self, matrices: Tensor, *, damping: Tensor, order: Tensor, previous: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(vectors, values)``; with ``refresh="qr"`` and ``previous`` (the last ``(b, d, d)``
        bases of the same factors) one warm-started QR power step instead of ``eigh``."""
        constant, denom = _parse_power(self.config.power)
        damping = damping.to(matrices.dtype)
        if previous is not None and self.config.refresh == "qr":
            sym = symmetrize(matrices)
            vecs = qr_refresh(sym, previous.to(sym.dtype))
            vals = (vecs * (sym @ vecs)).sum(dim=-2)  # diag(Q^T U Q)
            damped = vals.clamp_min(0) + damping[:, None]
        else:
            # float32: eigh of U + eps I (the same eigenvectors), which does not fail on the zero
            # cluster of a factor with dead units (see shifted_eigh)
            vals, vecs = shifted_eigh(matrices, damping)
            damped = vals.clamp_min(0) + damping[:, None]
            # a deterministic sign per eigenvector: its largest-magnitude entry is positive
            idx = vecs.abs().argmax(dim=-2, keepdim=True)
            sign = torch.where(torch.gather(vecs, -2, idx) < 0, -1.0, 1.0).to(vecs.dtype)
            vecs = vecs * sign
        if denom:
            power = 1.0 / (denom * order.to(matrices.dtype))
        else:
            power = torch.full((matrices.shape[0],), constant, dtype=matrices.dtype, device=matrices.device)
        values = damped.pow(-power[:, None])
        return vecs, values


def qr_refresh(matrices: Tensor, previous: Tensor) -> Tensor:
    r"""One warm-started power step per factor (SOAP): the batch ``(b, d, d)`` of refined bases.

    Columns of ``previous`` are ordered by decreasing :math:`q_j^\top U q_j`, orthogonalised by
    QR of :math:`U Q_{:, \pi}` (signs such that :math:`\operatorname{diag} R \ge 0`) and put back
    at their places (module docstring).
    """
    power = matrices @ previous  # U Q: the power step, and diag(Q^T U Q) from it
    est = (previous * power).sum(dim=-2)
    perm = torch.argsort(est, dim=-1, descending=True, stable=True)
    index = perm.unsqueeze(-2).expand_as(previous)
    q, r = torch.linalg.qr(torch.gather(power, -1, index))
    sign = torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(q.dtype)
    return torch.empty_like(q).scatter_(-1, index, q * sign.unsqueeze(-2))
