r"""The ``muon`` preconditioner: Newton--Schulz orthogonalisation of the (Nesterov) momentum.

Muon (Jordan et al., 2024, https://kellerjordan.github.io/posts/muon/; Liu et al., 2025,
arXiv 2502.16982) replaces the momentum matrix :math:`B = U \Sigma V^\top` of a 2-D weight by an
approximation of its orthogonal factor :math:`U V^\top`. With the optimizer's buffer
:math:`M \leftarrow \mu M + (1 - d) G` (``dampening`` :math:`d = \mu` makes it
``torch.optim.Muon``'s ``buf.lerp_(grad, 1 - mu)``), per block:

.. math::
    B &= (1 - d)\,G + \mu M \ \text{(nesterov)} \quad\text{or}\quad B = M, \\
    X_0 &= B / \max(\|B\|_F, \epsilon) \ \text{(transposed if it has more rows than columns)}, \\
    X_{s+1} &= a X_s + (b A_s + c A_s^2) X_s, \quad A_s = X_s X_s^\top, \\
    P &= r(A, B)\; X_{\text{steps}},

with :math:`(a, b, c) = (3.4445, -4.7750, 2.0315)`, 5 steps run in bfloat16 by default, and the
learning-rate ratio :math:`r = \sqrt{\max(1, A/B)}` (``"original"``) or :math:`0.2\sqrt{\max(A,
B)}` (``"match_rms_adamw"``, Liu et al.) for an :math:`A \times B` matrix; the optimizer then
applies :math:`W \leftarrow W (1 - \eta\,\mathrm{wd}) - \eta P`, which is exactly
``torch.optim.Muon``'s update. Views of rank 3 or more (convolution weights) are flattened to
:math:`(d_1, d_2 \cdots d_k)`; a vector is treated as a :math:`1 \times d` matrix (its update is
then about :math:`B/\|B\|`), although Muon is meant for hidden-layer matrices: route the rest to
AdamW with the ``partition`` preconditioner (the :func:`curvkit.Muon` preset does).

:meth:`MuonPreconditioner.apply_group` orthogonalises all same-shape blocks of a group in one batched iteration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from ..blocks import Block
from ..config import check_choice, check_in_unit_interval, check_positive, check_positive_int
from ..interfaces import PartConfig, Preconditioner
from ..registry import register

__all__ = ["MuonConfig", "MuonPreconditioner", "lr_ratio", "newton_schulz"]

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def newton_schulz(
    matrices: Tensor,
    *,
    coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
    steps: int = 5,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    r"""The quintic Newton--Schulz iteration on a batch ``(b, m, n)`` (see the module docstring).

    Returns the orthogonalised batch in ``dtype`` (the iteration's dtype).
    """
    a, b, c = coefficients
    x = matrices.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.transpose(-1, -2)
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.transpose(-1, -2)
        update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, update, x, beta=a)
    return x.transpose(-1, -2) if tall else x


def lr_ratio(rule: str, rows: int, cols: int) -> float:
    """Muon's learning-rate ratio for a ``rows x cols`` matrix (``"original"``,
    ``"match_rms_adamw"`` or ``"none"``)."""
    if rule == "original":
        return math.sqrt(max(1.0, rows / cols))
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


def _matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    if len(shape) == 1:
        return 1, int(shape[0])
    return int(shape[0]), math.prod(shape[1:])


@dataclass(frozen=True)
class MuonConfig(PartConfig):
    """Options of :class:`Muon` (defaults of ``torch.optim.Muon``).

    Attributes:
        nesterov: orthogonalise :math:`(1 - d) G + \\mu M` instead of :math:`M`.
        momentum: :math:`\\mu`, the optimizer's momentum (used for Nesterov only).
        dampening: :math:`d`, the optimizer's dampening (used for Nesterov only).
        coefficients: :math:`(a, b, c)` of the quintic iteration.
        ns_steps: Newton--Schulz steps.
        eps: floor of the Frobenius norm in the normalisation.
        adjust_lr: ``"original"`` (:math:`\\sqrt{\\max(1, A/B)}`), ``"match_rms_adamw"``
            (:math:`0.2\\sqrt{\\max(A, B)}`) or ``"none"``.
        iteration_dtype: ``"bfloat16"`` (as torch and the authors), ``"float32"`` or ``"float64"``.
    """

    nesterov: bool = True
    momentum: float = 0.95
    dampening: float = 0.95
    coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
    ns_steps: int = 5
    eps: float = 1e-7
    adjust_lr: str = "original"
    iteration_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"nesterov must be a bool, got {self.nesterov!r}")
        check_in_unit_interval("momentum", self.momentum)
        check_in_unit_interval("dampening", self.dampening)
        coeffs = tuple(self.coefficients)
        if len(coeffs) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in coeffs):
            raise ValueError(f"coefficients must be three finite numbers (a, b, c), got {self.coefficients!r}")
        object.__setattr__(self, "coefficients", tuple(float(v) for v in coeffs))
        check_positive_int("ns_steps", self.ns_steps)
        if self.ns_steps >= 100:
            raise ValueError(f"ns_steps must be < 100, got {self.ns_steps!r}")
        check_positive("eps", self.eps)
        check_choice("adjust_lr", self.adjust_lr, ("original", "match_rms_adamw", "none"))
        check_choice("iteration_dtype", self.iteration_dtype, tuple(_DTYPES))


@register("preconditioner", "muon")
class MuonPreconditioner(Preconditioner):
    """Orthogonalised (Nesterov) momentum of each block, as a matrix (Muon)."""

    Config = MuonConfig

    def describe(self, block: Block) -> str:
        """What the block gets."""
        rows, cols = _matrix_shape(block.shape)
        ratio = lr_ratio(self.config.adjust_lr, rows, cols)
        return f"Muon: orthogonalised {rows}x{cols} momentum, lr x {ratio:.3g}"

    def _target(self, direction: Tensor, gradient: Tensor) -> Tensor:
        cfg = self.config
        if not cfg.nesterov:
            return direction
        return gradient.mul(1.0 - cfg.dampening).add_(direction, alpha=cfg.momentum)

    def apply_group(
        self,
        blocks: Sequence[Block],
        states: Sequence[dict[str, Any]],
        directions: Sequence[Tensor],
        inverses: Sequence[Sequence[Any] | None],
        *,
        gradients: Sequence[Tensor],
    ) -> list[Tensor]:
        """All blocks of the group (same view shape) in one batched iteration."""
        if not blocks:
            return []
        rows, cols = _matrix_shape(blocks[0].shape)
        stacked = torch.stack([self._target(d, g).reshape(rows, cols) for d, g in zip(directions, gradients)])
        cfg = self.config
        ortho = newton_schulz(
            stacked, coefficients=cfg.coefficients, steps=cfg.ns_steps, eps=cfg.eps,
            dtype=_DTYPES[cfg.iteration_dtype],
        )
        ratio = lr_ratio(cfg.adjust_lr, rows, cols)
        return [(o.to(d.dtype) * ratio).reshape(d.shape) for o, d in zip(ortho, directions)]

    def apply(
        self,
        block: Block,
        state: dict[str, Any],
        direction: Tensor,
        inverses: Sequence[Any] | None,
        *,
        gradient: Tensor,
    ) -> Tensor:
        return self.apply_group([block], [state], [direction], [inverses], gradients=[gradient])[0]
