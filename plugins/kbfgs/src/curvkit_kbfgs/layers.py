r"""The K-BFGS block plan and the per-layer means read from a :class:`curvkit.LayerRecorder`.

K-BFGS handles ``nn.Linear`` layers :math:`h = W a + b`: one block per layer, the weight viewed as
``(out, in)`` with the bias, when it is optimised in the same param group, appended as a last
column (:class:`curvkit.HomogeneousLayout`), so that mode 0 (``out``) carries the pre-activation
factor :math:`H_g` and mode 1 (``in + 1``) the activation factor :math:`H_a`.

Every other parameter (``Conv2d``, norm layers, embeddings, a parameter shared by several
Linear layers, a bias optimised in another param group than its weight, or a tensor that is not a
model parameter) is refused with a reason: with ``unsupported="fallback"`` it gets a block of
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

from curvkit import FALLBACK_MOMENTUM, Block, HomogeneousLayout, LayerRecorder, fallback_block, layer_block

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

    Blocks follow the order of ``named_params`` (a layer's block sits where its weight is).
    """
    if model is None:
        raise ValueError("kbfgs builds its blocks from the model's Linear layers: pass model=<your nn.Module>")
    entry = {id(p): (name, gi) for name, p, gi in named_params}
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    layer_of: dict[int, Block] = {}
    reasons: dict[int, str] = {}
    for mname, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if isinstance(module, nn.Linear):
            weight = module.weight
            if id(weight) not in entry:
                reason = "bias of a Linear layer whose weight is not optimised"
            elif owners[id(weight)] > 1 or id(weight) in layer_of:
                reason = "Linear layer whose weight is shared by several layers"
            else:
                block = _linear_block(mname, module, entry, max_factor_dim)
                for p in block.params:
                    layer_of[id(p)] = block
                reason = "bias in another param group than its Linear weight"
        else:
            reason = f"{type(module).__name__} layer (K-BFGS handles nn.Linear only)"
        for p in own:
            reasons.setdefault(id(p), reason)
    blocks: list[Block] = []
    emitted: set[int] = set()
    for name, p, gi in named_params:
        block = layer_of.get(id(p))
        if block is None:
            blocks.append(_fallback_block(name, p, gi, reasons.get(id(p), "not a parameter of the model"),
                                          max_factor_dim, unsupported))
        elif id(block) not in emitted:
            emitted.add(id(block))
            blocks.append(block)
    return blocks


def _linear_block(mname: str, module: nn.Linear, entry: dict, max_factor_dim: int | None) -> Block:
    weight, bias = module.weight, module.bias
    wname, group = entry[id(weight)]
    has_bias = bias is not None and id(bias) in entry and entry[id(bias)][1] == group
    return layer_block(
        mname or wname.rsplit(".", 1)[0], module, weight=weight, bias=bias if has_bias else None,
        group=group, max_factor_dim=max_factor_dim,
        rule=f"Linear: H_g (out) x H_a (in{' + 1 homogeneous bias' if has_bias else ''})",
    )


def _fallback_block(
    name: str, param: nn.Parameter, group: int, reason: str, max_factor_dim: int | None, unsupported: str
) -> Block:
    if unsupported == "error":
        raise ValueError(
            f"kbfgs has no quasi-Newton factors for parameter {name!r} of shape {tuple(param.shape)} "
            f"({reason}); pass unsupported='fallback' to give it the plain momentum direction, or leave "
            f"it out of the optimizer's params"
        )
    return fallback_block(name, param, group, reason=reason, max_factor_dim=max_factor_dim)


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
