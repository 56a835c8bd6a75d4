r"""The ``adam_eigenbasis`` preconditioner: Adam in the eigenbasis of the Kronecker factors (SOAP).

SOAP (Vyas et al., 2024, arXiv 2409.11321, Algorithm 3) runs Adam in the rotated coordinates of
Shampoo's factors. With per-mode orthonormal bases :math:`Q_i` (from the ``eigenbasis`` inverter)
and the rotation :math:`R(X) = X \times_1 Q_1^\top \cdots \times_k Q_k^\top`, per step :math:`t`:

.. math::
    V &\leftarrow \beta_2 V + (1 - \beta_2)\, R(G)^{\odot 2}, \\
    N' &= \frac{R(M)}{\sqrt{V} + \epsilon}, \qquad
    P = \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}\; N' \times_1 Q_1 \cdots \times_k Q_k,

where :math:`M` is the optimizer's momentum buffer. With ``momentum = dampening = beta1`` it is
Adam's first moment :math:`M \leftarrow \beta_1 M + (1 - \beta_1) G`, kept in the original
coordinates and rotated each step (as in the paper, so a basis refresh needs nothing for it);
:math:`V` (the second moment) lives in the rotated coordinates and is carried across basis
refreshes unchanged (``on_refresh="carry"``, the paper's choice; eigenvalues come in a fixed
order, so coordinate :math:`j` keeps meaning "the j-th eigendirection"). ``on_refresh="rotate"``
instead re-expresses :math:`V` in the new basis, :math:`V \leftarrow V \times_i (R_i \odot R_i)`
with :math:`R_i = Q_i^{\mathrm{new}\top} Q_i^{\mathrm{old}}` (exact for a diagonal second moment).
A refresh is noticed by the ``version`` of the block's :class:`~curvkit.operators.EigenBasis` entries.
Unfactored modes (and blocks without a basis yet) use the identity, i.e. plain Adam.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from ..blocks import Block
from ..config import check_choice, check_in_unit_interval, check_positive
from ..contractions import mode_products
from ..estimators.tensor_normal import statistics_dtype
from ..interfaces import PartConfig, Preconditioner
from ..registry import register
from ._common import eigenbases, version_of

__all__ = ["AdamEigenbasis", "AdamEigenbasisConfig"]


@dataclass(frozen=True)
class AdamEigenbasisConfig(PartConfig):
    """Options of :class:`AdamEigenbasis`.

    Attributes:
        beta1: Adam's first-moment decay, used for the bias correction only (the first moment is
            the optimizer's buffer: set its ``momentum`` and ``dampening`` to the same value).
        beta2: decay of the second moment in the rotated basis.
        eps: :math:`\\epsilon` added to :math:`\\sqrt{V}`.
        bias_correction: apply Adam's bias correction.
        on_refresh: ``"carry"`` (keep :math:`V` as it is when the basis changes, SOAP) or
            ``"rotate"`` (re-express it in the new basis).
    """

    beta1: float = 0.95
    beta2: float = 0.95
    eps: float = 1e-8
    bias_correction: bool = True
    on_refresh: str = "carry"

    def __post_init__(self) -> None:
        check_in_unit_interval("beta1", self.beta1)
        check_in_unit_interval("beta2", self.beta2)
        check_positive("eps", self.eps)
        if not isinstance(self.bias_correction, bool):
            raise ValueError(f"bias_correction must be a bool, got {self.bias_correction!r}")
        check_choice("on_refresh", self.on_refresh, ("carry", "rotate"))


@register("preconditioner", "adam_eigenbasis")
class AdamEigenbasis(Preconditioner):
    """Adam with its second moment in the eigenbasis of each block's factors (SOAP)."""

    Config = AdamEigenbasisConfig
    #: Eigenbases (the ``eigenbasis`` inverter), or dense matrices, which it decomposes itself.
    accepts = ("eigenbasis", "matrix")

    def init_state(self, block: Block) -> dict[str, Any]:
        ref = block.params[0]
        return {
            "exp_avg_sq": torch.zeros(block.shape, dtype=statistics_dtype(ref.dtype), device=ref.device),
            "step": 0,
            "version": -1,
            "bases": [],
        }

    def describe(self, block: Block) -> str:
        """What the block gets."""
        modes = sum(block.factored)
        return f"Adam in the eigenbasis of {modes} of {block.order} modes (SOAP)"

    def apply(
        self,
        block: Block,
        state: dict[str, Any],
        direction: Tensor,
        inverses: Sequence[Any] | None,
        *,
        gradient: Tensor,
    ) -> Tensor:
        cfg = self.config
        v = state["exp_avg_sq"]
        work = v.dtype
        bases = eigenbases(inverses, block.order, work)
        version = version_of(inverses)
        if cfg.on_refresh == "rotate" and version != state["version"]:
            old = state["bases"]
            if old and all((a is None) == (b is None) for a, b in zip(old, bases)):
                mix = [None if b is None else (b.T @ a) ** 2 for a, b in zip(old, bases)]
                v.copy_(mode_products(v, mix))
            state["bases"] = [None if b is None else b.clone() for b in bases]
        state["version"] = version
        to_rot = [None if q is None else q.T for q in bases]
        g_rot = mode_products(gradient.to(work), to_rot)
        m_rot = mode_products(direction.to(work), to_rot)
        v.mul_(cfg.beta2).addcmul_(g_rot, g_rot, value=1.0 - cfg.beta2)
        state["step"] += 1
        t = state["step"]
        scale = math.sqrt(1.0 - cfg.beta2**t) / (1.0 - cfg.beta1**t) if cfg.bias_correction else 1.0
        n_rot = m_rot / (v.sqrt() + cfg.eps)
        return (mode_products(n_rot, bases) * scale).to(direction.dtype)
