r"""The ``shampoo`` estimator: mode Gram matrices of the minibatch gradient.

For a block with view :math:`d_1 \times \cdots \times d_k` and minibatch (true-label) gradient
:math:`G`, the statistics of mode :math:`i` are built from :math:`\hat S_i = G_{(i)} G_{(i)}^\top`
(:func:`curvkit.contractions.mode_gram`), either

* ``accumulate="ema"`` (as the TNT authors ran Shampoo):
  :math:`S_i \leftarrow \beta S_i + (1 - \beta) \hat S_i`, the first update setting
  :math:`S_i = \hat S_i`; or
* ``accumulate="sum"`` (AdaGrad, as in the Shampoo paper): :math:`S_i = \sum_t \hat S_{i,t}`,
  kept as the running mean times the number of updates.

There is no trace normalisation: the factors handed to the inverter are the :math:`S_i`
themselves, which an inverter such as ``coupled_newton`` or ``damped_eigen(power="1/2k")`` turns
into :math:`(S_i + \epsilon I)^{-1/(2k)}`.

With an explicit ``decay`` (the optimizer's warm start) :meth:`ShampooStatistics.update`
computes :math:`S \leftarrow \text{decay}\, S + (1 - \text{decay}) \hat S` on the running mean in
both modes.

``block_size`` tiles parameters whose view has a mode larger than it (see
:mod:`curvkit_shampoo.blocking`): every tile :math:`t` keeps its own :math:`S_{t,i}` by the rules
above, from its own part :math:`G_t` of the gradient. The statistics of mode :math:`i` are kept as
one ``(T, r_i, r_i)`` tensor (``T = 1`` for an untiled block, ``r_i = d_i``), and
:meth:`ShampooStatistics.factors` returns one factor per (tile, mode), tile-major. A tiled block
needs a preconditioner that reads them per tile: ``grafted_kronecker`` (``graft="none"`` is the
plain Shampoo direction), which the :func:`~curvkit_shampoo.Shampoo` preset picks whenever
``block_size`` is set; curvkit's ``kronecker_mode`` expects one inverse per mode and refuses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

import curvkit
from curvkit import Block, BlockEvidence, CurvatureEstimator, EvidenceSpec, Factor, PartConfig, Source
from curvkit.config import check_choice, check_in_unit_interval, check_positive_int
from curvkit.contractions import mode_gram

from .blocking import TiledLayout, tile_grams, tiled_block

__all__ = ["ShampooStatistics", "ShampooStatisticsConfig"]


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics in float32 for half-precision parameters, else in the parameter dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _tiling(block: Block) -> tuple[int, tuple[int, ...]]:
    """``(T, tile_shape)`` of a block: its tiles, or ``(1, view shape)`` for an untiled block."""
    layout = block.layout
    if isinstance(layout, TiledLayout):
        return layout.num_tiles, layout.tile_shape
    return 1, block.shape


@dataclass(frozen=True)
class ShampooStatisticsConfig(PartConfig):
    """Options of :class:`ShampooStatistics`.

    Attributes:
        stat_decay: EMA decay :math:`\\beta` of the statistics (0.9 as the TNT authors ran it);
            unused with ``accumulate="sum"``.
        accumulate: ``"ema"`` (exponential moving average) or ``"sum"`` (AdaGrad running sum).
        block_size: tile parameters whose view has a mode larger than this into tiles of at most
            this size per mode, each with its own statistics (``None``: no tiling).
    """

    stat_decay: float = 0.9
    accumulate: str = "ema"
    block_size: int | None = None

    def __post_init__(self) -> None:
        check_in_unit_interval("stat_decay", self.stat_decay)
        check_choice("accumulate", self.accumulate, ("ema", "sum"))
        check_positive_int("block_size", self.block_size, allow_none=True)


@curvkit.register("estimator", "shampoo")
class ShampooStatistics(CurvatureEstimator):
    """Shampoo's per-mode statistics of the minibatch gradient (see the module docstring)."""

    Config = ShampooStatisticsConfig

    @property
    def evidence(self) -> EvidenceSpec:
        return EvidenceSpec(source=Source.MINIBATCH)

    def plan(
        self,
        named_params: Sequence[tuple[str, nn.Parameter, int]],
        *,
        model: nn.Module | None,
        max_factor_dim: int | None,
    ) -> list[Block]:
        """The default one-block-per-parameter plan, parameters with modes over ``block_size`` tiled."""
        if self.config.block_size is None:
            return super().plan(named_params, model=model, max_factor_dim=max_factor_dim)
        return [
            tiled_block(n, p, g, block_size=self.config.block_size, max_factor_dim=max_factor_dim)
            for n, p, g in named_params
        ]

    def init_state(self, block: Block) -> dict[str, Any]:
        ref = block.params[0]
        dtype = _stat_dtype(ref.dtype)
        tiles, shape = _tiling(block)
        return {
            "grams": [
                torch.zeros(tiles, r, r, dtype=dtype, device=ref.device) if f else None
                for r, f in zip(shape, block.factored)
            ],
            "updates": 0,
        }

    def check_state(self, block: Block, state: dict[str, Any]) -> None:
        grams = state.get("grams")
        if grams is None or len(grams) != block.order or not isinstance(state.get("updates"), int):
            raise ValueError(f"block {block.name!r}: saved Shampoo statistics do not match its {block.order} modes")
        tiles, shape = _tiling(block)
        for r, f, s in zip(shape, block.factored, grams):
            if (s is None) == f or (s is not None and tuple(s.shape) != (tiles, r, r)):
                got = None if s is None else tuple(s.shape)
                raise ValueError(
                    f"block {block.name!r}: saved statistic of shape {got} does not fit {tiles} tile(s) with a "
                    f"mode of size {r} (factored: {f}); load it into an optimizer with the same block plan"
                )

    @torch.no_grad()
    def update(
        self, block: Block, state: dict[str, Any], evidence: BlockEvidence, *, decay: float | None = None
    ) -> None:
        grads = evidence.gradients
        if all(g is None for g in grads):
            return
        grams = state["grams"]
        dtype = next((s.dtype for s in grams if s is not None), _stat_dtype(block.params[0].dtype))
        filled = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, block.params)]
        g = block.to_view(filled).to(dtype)
        n = state["updates"]
        if decay is None:
            if self.config.accumulate == "ema":
                decay = 0.0 if n == 0 else self.config.stat_decay
            else:  # running mean, scaled back to the sum in factors()
                decay = n / (n + 1)
        tiled = isinstance(block.layout, TiledLayout)
        for i, s in enumerate(grams):
            if s is not None:
                hat = tile_grams(block.layout, g, i) if tiled else mode_gram(g, i).unsqueeze(0)
                s.mul_(decay).add_(hat, alpha=1.0 - decay)
        state["updates"] = n + 1

    def factors(self, block: Block, state: dict[str, Any], *, damping: float) -> list[Factor | None] | None:
        """One factor per (tile, mode), tile-major (entry ``t * k + i`` is :math:`S_{t,i}`; one per
        mode for an untiled block), ``None`` on unfactored modes, or ``None`` before any update."""
        n = state["updates"]
        if n == 0:
            return None
        scale = float(n) if self.config.accumulate == "sum" else 1.0
        grams = [None if s is None else (s * scale if scale != 1.0 else s) for s in state["grams"]]
        tiles, _ = _tiling(block)
        return [None if s is None else Factor(s[t], damping) for t in range(tiles) for s in grams]
