r"""The K-BFGS block plan and the per-layer means read from a :class:`curvkit.LayerRecorder`.

K-BFGS handles ``nn.Linear`` layers :math:`h = W a + b`: one block per layer, the weight viewed as
``(out, in)`` with the bias, when it is optimised in the same param group, appended as a last
column (:class:`curvkit.HomogeneousLayout`), so that mode 0 (``out``) carries the pre-activation
factor :math:`H_g` and mode 1 (``in + 1``) the activation factor :math:`H_a`.

The weight and bias form one block even when they sit in different param groups (the block's
schedule follows the weight's group). Every other parameter (``Conv2d``, norm layers, embeddings,
attention, a parameter shared by several layers, or a tensor that is not a model parameter) is
refused with a reason: with ``unsupported="fallback"`` it gets a block of
kind ``"fallback: momentum"`` with every mode unfactored (the plain momentum direction; the
estimator returns no factors for it), with ``unsupported="error"`` the plan raises
``ValueError``. (The paper defines K-BFGS for fully connected layers only.)

Rows: a layer input of shape ``(..., in)`` contributes one row per leading index; a layer called
several times in one forward pass contributes the rows of every call.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from curvkit import FALLBACK_MOMENTUM, Block, HomogeneousLayout, LayerRecorder

__all__ = ["FALLBACK_KIND", "LayerMeans", "layer_means", "layer_inputs", "plan_blocks"]

#: ``Block.kind`` of the parameters that take the plain momentum direction.
FALLBACK_KIND = FALLBACK_MOMENTUM


def plan_blocks(
    named_params: Sequence[tuple[str, nn.Parameter, int]],
    *,
    model: nn.Module | None,
    max_factor_dim: int | None,
    unsupported: str,
) -> list[Block]:
    """One block per optimised ``nn.Linear`` layer, fallback blocks (or an error) for the rest.

    Blocks follow the order of ``named_params`` (a layer's block sits where its weight is). The
    planning is kfac's (:func:`curvkit_kfac.planning.plan_layers`) with K-BFGS's layer kind; a
    weight shared by several layers takes the fallback (the pre-activation pairs of K-BFGS are
    defined per layer).
    """
    # imported here, not at module import: importing curvkit_kfac registers kfac's parts, which
    # must happen while the registry loads kfac's own entry point (so it names the right package)
    from curvkit_kfac.planning import LayerKind, plan_layers
    
    kinds = (LayerKind((nn.Linear,), "Linear", factors=("H_g", "H_a")),)
    return plan_layers(
        named_params, model=model, max_factor_dim=max_factor_dim, kinds=kinds, method="kbfgs",
        fallback=unsupported, fallback_option="unsupported", tied="fallback",
    )


def _rows(tensors: Sequence[Tensor | None]) -> Tensor | None:
    if not tensors or any(t is None for t in tensors):
        return None
    rows = [t.reshape(-1, t.shape[-1]) for t in tensors]  # type: ignore[union-attr]
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def layer_inputs(recorder: LayerRecorder | None, block: Block, dtype: torch.dtype) -> Tensor | None:
    """The recorded inputs of the block's layer as ``(rows, in [+ 1])`` (homogeneous 1 appended
    when the block has a bias column), or ``None`` when the layer recorded nothing."""
    if recorder is None or block.module is None:
        return None
    a = _rows(recorder[block.module].inputs)
    if a is None:
        return None
    a = a.to(dtype)
    if isinstance(block.layout, HomogeneousLayout) and block.layout.has_bias:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=dtype, device=a.device)], dim=1)
    return a


class LayerMeans:
    r"""Means of one recorded forward/backward cycle of a layer.

    Attributes:
        a: mean input :math:`\bar a` (with the homogeneous 1), or ``None`` without inputs.
        h: mean pre-activation :math:`\bar h` over rows.
        g: :math:`\bar g = \sum_{\text{rows}} \partial L / \partial h`, which for a batch-mean loss
            is the mean of the per-example pre-activation gradients (the authors' scale).
        rows: the number of rows.
    """

    def __init__(self, a: Tensor | None, h: Tensor, g: Tensor, rows: int) -> None:
        self.a, self.h, self.g, self.rows = a, h, g, rows


def layer_means(recorder: LayerRecorder | None, block: Block, dtype: torch.dtype, *, inputs: bool) -> LayerMeans | None:
    """The :class:`LayerMeans` of the block's layer from the recorder's ``"minibatch"`` records, or
    ``None`` when the layer has no complete record (no call, or an output without gradient)."""
    if recorder is None or block.module is None:
        return None
    record = recorder[block.module]
    h = _rows(record.outputs)
    g = _rows(record.grads("minibatch"))
    if h is None or g is None or h.shape != g.shape:
        return None
    a = layer_inputs(recorder, block, dtype) if inputs else None
    if inputs and a is None:
        return None
    return LayerMeans(
        None if a is None else a.mean(dim=0), h.to(dtype).mean(dim=0), g.to(dtype).sum(dim=0), h.shape[0]
    )
