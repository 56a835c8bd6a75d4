r"""The ``grafted_kronecker`` preconditioner: the Kronecker direction with its norm grafted from
a first-order method, and a start step before which the first-order direction alone is used.

Per block, with :math:`M` the momentum buffer (the direction the optimizer hands over), :math:`g`
the minibatch gradient and :math:`P = M \times_1 V_1 \cdots \times_k V_k` the direction of
curvkit's ``kronecker_mode`` (for a block tiled by ``block_size``, :math:`P` is formed per tile,
:math:`P_t = M_t \times_1 V_{t,1} \cdots \times_k V_{t,k}`, from the per-(tile, mode) inverses:
see :func:`curvkit_shampoo.blocking.kronecker_direction`), the graft direction :math:`D` is

* ``graft="sgd"``: :math:`D = M`;
* ``graft="adam"``: :math:`D = M / (\sqrt{v / (1 - \beta_2^t)} + \delta)` with
  :math:`v \leftarrow \beta_2 v + (1 - \beta_2) g^2` (Adam's second moment, bias-corrected, kept
  in the block's state; the momentum buffer plays the first moment);
* ``graft="adagrad"``: :math:`D = M / (\sqrt{v} + \delta)` with :math:`v \leftarrow v + g^2`;
* ``graft="none"``: no grafting (:math:`D = M` before ``start_step``, :math:`P` after).

and the direction is (Agarwal et al., "Disentangling adaptive gradient methods", 2020)

.. math:: \tilde P = \frac{\|D\|_F}{\|P\|_F} P \quad (t \ge \text{start\_step}), \qquad
          \tilde P = D \quad (t < \text{start\_step} \text{ or no inverses yet}),

with :math:`\tilde P = 0` when :math:`P = 0`. :math:`t` counts this block's ``apply`` calls
(one per optimizer step), kept in the block's state. The norms are those of the whole block (a
tiled parameter is grafted as one: its tiles keep their relative Shampoo scales), taken over the
entries that reach the parameter (the zero padding of :mod:`curvkit_shampoo.blocking` is
excluded). With ``graft="none"`` and ``start_step=0`` this is the plain Shampoo direction, also
for tiled blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

import curvkit
from curvkit import Block, PartConfig, Preconditioner
from curvkit.config import check_choice, check_in_unit_interval, check_positive
from .blocking import kronecker_direction

__all__ = ["GraftedKronecker", "GraftedKroneckerConfig"]


@dataclass(frozen=True)
class GraftedKroneckerConfig(PartConfig):
    """Options of :class:`GraftedKronecker`.

    Attributes:
        graft: ``"adam"``, ``"adagrad"``, ``"sgd"`` or ``"none"``.
        beta2: Adam's second-moment decay :math:`\\beta_2`.
        graft_epsilon: :math:`\\delta` of the Adam / AdaGrad denominator.
        start_step: steps (per block) that use the graft direction alone before the Kronecker
            direction starts.
    """

    graft: str = "adam"
    beta2: float = 0.999
    graft_epsilon: float = 1e-8
    start_step: int = 0

    def __post_init__(self) -> None:
        check_choice("graft", self.graft, ("adam", "adagrad", "sgd", "none"))
        check_in_unit_interval("beta2", self.beta2)
        check_positive("graft_epsilon", self.graft_epsilon)
        if not isinstance(self.start_step, int) or isinstance(self.start_step, bool) or self.start_step < 0:
            raise ValueError(f"start_step must be an integer >= 0, got {self.start_step!r}")


@curvkit.register("preconditioner", "grafted_kronecker")
class GraftedKronecker(Preconditioner):
    """Kronecker mode products, per tile for tiled blocks, with a grafted norm (see the module
    docstring)."""

    Config = GraftedKroneckerConfig

    def init_state(self, block: Block) -> dict[str, Any]:
        state: dict[str, Any] = {"step": 0}
        if self.config.graft in ("adam", "adagrad"):
            ref = block.params[0]
            dtype = torch.float32 if ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype
            state["exp_avg_sq"] = torch.zeros(block.shape, dtype=dtype, device=ref.device)
        return state

    def graft_direction(self, state: dict[str, Any], direction: Tensor, gradient: Tensor) -> Tensor:
        """Update the graft statistics with ``gradient`` and return the graft direction of ``direction``."""
        cfg = self.config
        if cfg.graft in ("sgd", "none"):
            return direction
        v = state["exp_avg_sq"]
        g = gradient.to(v.dtype)
        if cfg.graft == "adam":
            v.mul_(cfg.beta2).addcmul_(g, g, value=1.0 - cfg.beta2)
            denom = (v / (1.0 - cfg.beta2 ** state["step"])).sqrt_()
        else:
            v.addcmul_(g, g)
            denom = v.sqrt()
        return direction / denom.add_(cfg.graft_epsilon).to(direction.dtype)

    def apply(
        self,
        block: Block,
        state: dict[str, Any],
        direction: Tensor,
        inverses: Sequence[Tensor | None] | None,
        *,
        gradient: Tensor,
    ) -> Tensor:
        state["step"] += 1
        graft = self.graft_direction(state, direction, gradient)
        if inverses is None or state["step"] <= self.config.start_step:
            return graft
        p = kronecker_direction(block, direction, inverses)
        if self.config.graft == "none":
            return p
        p_norm = torch.linalg.vector_norm(p)
        ratio = torch.linalg.vector_norm(graft) / torch.where(p_norm > 0, p_norm, torch.ones_like(p_norm))
        return p * torch.where(p_norm > 0, ratio, torch.zeros_like(ratio))
