r"""The ``adamw`` preconditioner: Adam's direction from the gradient, for blocks a method does
not model (Loshchilov & Hutter, 2019, arXiv 1711.05101).

Per block, with the minibatch gradient :math:`G` and step :math:`t` (counted per block):

.. math::
    m \leftarrow \beta_1 m + (1 - \beta_1) G, \quad
    v \leftarrow \beta_2 v + (1 - \beta_2) G^{\odot 2}, \quad
    P = s\,\frac{m / (1 - \beta_1^t)}{\sqrt{v / (1 - \beta_2^t)} + \epsilon}.

The optimizer's momentum buffer is ignored; the optimizer applies the learning rate and the
decoupled weight decay, :math:`W \leftarrow W(1 - \eta\,\mathrm{wd}) - \eta P`, so with
:math:`s = 1` the update is exactly ``torch.optim.AdamW``'s. ``scale`` :math:`s` gives these
blocks their own effective learning rate :math:`\eta s` inside an optimizer whose ``lr`` suits
another preconditioner (Muon's, say).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from ..blocks import Block
from ..config import check_in_unit_interval, check_positive
from ..estimators.tensor_normal import statistics_dtype
from ..interfaces import PartConfig, Preconditioner
from ..registry import register

__all__ = ["AdamW", "AdamWConfig"]


@dataclass(frozen=True)
class AdamWConfig(PartConfig):
    """Options of :class:`AdamW`.

    Attributes:
        beta1: decay of the first moment.
        beta2: decay of the second moment.
        eps: :math:`\\epsilon` added to the bias-corrected :math:`\\sqrt{v}`.
        scale: factor :math:`s` on the direction (effective learning rate :math:`\\eta s`).
    """

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    scale: float = 1.0

    def __post_init__(self) -> None:
        check_in_unit_interval("beta1", self.beta1)
        check_in_unit_interval("beta2", self.beta2)
        check_positive("eps", self.eps)
        check_positive("scale", self.scale)


@register("preconditioner", "adamw")
class AdamW(Preconditioner):
    """Adam moments of the gradient with bias correction; ignores curvature and the momentum buffer."""

    Config = AdamWConfig

    def init_state(self, block: Block) -> dict[str, Any]:
        ref = block.params[0]
        dtype = statistics_dtype(ref.dtype)
        return {
            "exp_avg": torch.zeros(block.shape, dtype=dtype, device=ref.device),
            "exp_avg_sq": torch.zeros(block.shape, dtype=dtype, device=ref.device),
            "step": 0,
        }

    def describe(self, block: Block) -> str:
        """What the block gets."""
        return "AdamW (no curvature model)"

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
        m, v = state["exp_avg"], state["exp_avg_sq"]
        g = gradient.to(m.dtype)
        m.lerp_(g, 1.0 - cfg.beta1)
        v.mul_(cfg.beta2).addcmul_(g, g, value=1.0 - cfg.beta2)
        state["step"] += 1
        t = state["step"]
        bc1 = 1.0 - cfg.beta1**t
        bc2 = 1.0 - cfg.beta2**t
        denom = v.sqrt() / (bc2**0.5) + cfg.eps
        return (m / denom * (cfg.scale / bc1)).to(direction.dtype)
