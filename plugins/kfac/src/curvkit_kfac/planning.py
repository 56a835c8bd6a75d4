r"""Layer planning shared by the layer-based plugins (``kfac``, and ``kbfgs`` imports it).

:func:`plan_layers` turns ``(name, parameter, group)`` triples and the model into blocks:

* one ``(out, in_flat [+ 1])`` block (:func:`curvkit.layer_block`) per supported layer whose weight
  is optimised, the bias appended as the homogeneous last column whenever it is optimised too,
  **in whichever param group** (the usual "no weight decay on biases" groups keep their layer
  block; the block's schedule follows the weight's group, ``block.group``, and the optimizer
  applies each parameter's own group ``lr`` and ``weight_decay``);
* a weight shared by several supported layers (tied weights): with ``tied="share"`` one block of
  the weight alone (:class:`SharedLayerBlock`, its statistics taken from every use; the layers'
  biases get fallback blocks), with ``tied="fallback"`` a fallback block;
* a fallback block (plain momentum, :func:`curvkit.fallback_block`), or ``ValueError`` with
  ``fallback="error"``, for every other parameter, with the reason in the block plan.

``nn.MultiheadAttention`` is planned as a fallback, parameters and ``out_proj`` alike: its forward
calls ``torch.nn.functional.multi_head_attention_forward`` with the projection weights
directly and never runs ``out_proj.forward``, so no layer hook would ever see its inputs or output
gradients (a Kronecker block there would silently get no statistics).

Norm-layer scales and shifts (``LayerNorm``, ``BatchNorm``, ...) take the fallback too: they are
vectors whose exact diagonal Fisher is cheap, but neither KFAC nor K-BFGS defines a factor for
them, and the papers leave them to the first-order update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from torch import nn

from curvkit import Block, fallback_block, layer_block

__all__ = ["LayerKind", "SharedLayerBlock", "layer_modules", "plan_layers"]


@dataclass(frozen=True)
class LayerKind:
    """A layer type a method factors.

    Attributes:
        types: the module classes.
        label: a short name for the block plan (``"Linear"``).
        detail: appended to the label in the block plan's rule (``", KFC patches"``).
        axes: names of the view's two modes in the block plan (``("out", "in")``).
        factors: the factor names of the ``out`` and ``in`` modes (``("G", "A")``).
        unsupported: optional check ``module -> reason or None`` for instances the method refuses
            (grouped convolutions).
    """

    types: tuple[type[nn.Module], ...]
    label: str
    factors: tuple[str, str] = ("G", "A")
    detail: str = ""
    axes: tuple[str, str] = ("out", "in")
    unsupported: Callable[[nn.Module], str | None] | None = None


@dataclass(eq=False)
class SharedLayerBlock(Block):
    """A layer block whose weight is used by several modules (tied weights).

    ``module`` is the first use; ``uses`` lists every module whose calls contribute statistics.
    """

    uses: tuple[nn.Module, ...] = field(default_factory=tuple)


def layer_modules(block: Block) -> tuple[nn.Module, ...]:
    """The modules whose records feed ``block`` (every use of a tied weight; else its module)."""
    uses = getattr(block, "uses", ())
    if uses:
        return tuple(uses)
    return () if block.module is None else (block.module,)


def _mha_children(model: nn.Module) -> dict[int, str]:
    out: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            for sub in module.modules():
                out[id(sub)] = name or "the model"
    return out


def plan_layers(
    named_params: Sequence[tuple[str, nn.Parameter, int]],
    *,
    model: nn.Module | None,
    max_factor_dim: int | None,
    kinds: Sequence[LayerKind],
    method: str,
    fallback: str,
    fallback_option: str,
    tied: str = "fallback",
) -> list[Block]:
    """Blocks for the layers of ``model`` (see the module docstring for the rules).

    Args:
        named_params: ``(name, parameter, group)`` for every optimised parameter.
        model: the model whose layers are planned.
        max_factor_dim: modes larger than this are unfactored.
        kinds: the layer types the method factors.
        method: the method's name, for messages.
        fallback: ``"fallback"`` / ``"momentum"`` (plain momentum blocks) or ``"error"``.
        fallback_option: the option name the user sets (``"fallback"`` or ``"unsupported"``), for
            the error message.
        tied: ``"share"`` (one block fed by every use of a tied weight) or ``"fallback"``.

    Returns:
        Blocks covering every parameter once, in the order of ``named_params`` (a layer's block
        sits where its weight is).
    """
    if model is None:
        raise ValueError(f"{method} builds its blocks from the model's layers: pass model=<your nn.Module>")
    if tied not in ("share", "fallback"):
        raise ValueError(f"tied must be 'share' or 'fallback', got {tied!r}")
    entry = {id(p): (name, p, gi) for name, p, gi in named_params}
    in_mha = _mha_children(model)
    labels = [k.label for k in kinds]
    supported_label = labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " or " + labels[-1]

    # which supported modules use each weight
    uses: dict[int, list[tuple[str, nn.Module, LayerKind]]] = {}
    reasons: dict[int, str] = {}
    for mname, module in model.named_modules():
        kind = next((k for k in kinds if isinstance(module, k.types)), None)
        reason = None
        if id(module) in in_mha:
            reason = (
                f"nn.MultiheadAttention {in_mha[id(module)]!r} (its forward never calls "
                f"out_proj.forward, so no layer records reach {method})"
            )
        elif kind is None:
            reason = f"{type(module).__name__} is not a {supported_label} layer"
        elif kind.unsupported is not None:
            reason = kind.unsupported(module)
        weight = getattr(module, "weight", None)
        if reason is None and isinstance(weight, nn.Parameter):
            uses.setdefault(id(weight), []).append((mname, module, kind))  # type: ignore[arg-type]
            continue
        for p in module.parameters(recurse=False):
            reasons.setdefault(id(p), reason or "not a layer weight")

    owners: dict[int, list[str]] = {}
    for mname, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(mname or "the model")
    layer_of: dict[int, Block] = {}
    for wid, users in uses.items():
        if len(owners.get(wid, ())) > len(users):
            others = sorted(set(owners[wid]) - {n or "the model" for n, _, _ in users})
            reasons[wid] = f"weight also used by {', '.join(map(repr, others))}, which {method} does not factor"
            for _, module, _ in users:
                bias = getattr(module, "bias", None)
                if isinstance(bias, nn.Parameter):
                    reasons.setdefault(id(bias), "bias of a layer whose weight is also used elsewhere")
            continue
        if wid not in entry:
            for _, module, _ in users:
                bias = getattr(module, "bias", None)
                if isinstance(bias, nn.Parameter):
                    reasons.setdefault(id(bias), "bias of a layer whose weight is not optimised")
            continue
        if len(users) == 1:
            mname, module, kind = users[0]
            block = _single_block(mname, module, kind, entry, max_factor_dim)
        else:
            names = ", ".join(repr(n) for n, _, _ in users)
            for _, module, _ in users:
                bias = getattr(module, "bias", None)
                if isinstance(bias, nn.Parameter):
                    reasons.setdefault(id(bias), f"bias of a layer whose weight is shared by {names}")
            if tied == "fallback":
                reasons[wid] = f"weight shared by several layers ({names})"
                continue
            if len({id(k) for _, _, k in users}) > 1:
                reasons[wid] = f"weight tied across layers of different kinds ({names})"
                continue
            block = _shared_block(users, entry, max_factor_dim)
        for p in block.params:
            layer_of[id(p)] = block

    unknown = [
        f"{name!r} {tuple(p.shape)}: {reasons.get(id(p), 'not a parameter of the model')}"
        for name, p, _ in named_params
        if id(p) not in layer_of
    ]
    if unknown and fallback == "error":
        raise ValueError(
            f"{method} has no factors for {len(unknown)} parameter(s): {'; '.join(unknown)}. Pass "
            f"{fallback_option}='{'momentum' if fallback_option == 'fallback' else 'fallback'}' to give them "
            f"the plain momentum direction, or leave them out of the optimizer's params"
        )
    blocks: list[Block] = []
    emitted: set[int] = set()
    for name, p, gi in named_params:
        block = layer_of.get(id(p))
        if block is None:
            reason = reasons.get(id(p), "not a parameter of the model")
            blocks.append(fallback_block(name, p, gi, reason=reason, max_factor_dim=max_factor_dim))
        elif id(block) not in emitted:
            emitted.add(id(block))
            blocks.append(block)
    return blocks


def _rule(kind: LayerKind, has_bias: bool, bias_group: int | None, group: int) -> str:
    g, a = kind.factors
    out, inp = kind.axes
    rule = f"{kind.label}{kind.detail}: {g} ({out}) x {a} ({inp}{' + 1 homogeneous bias' if has_bias else ''})"
    if has_bias and bias_group is not None and bias_group != group:
        rule += f", bias from param group {bias_group}"
    return rule


def _single_block(mname: str, module: nn.Module, kind: LayerKind, entry: dict, max_factor_dim: int | None) -> Block:
    weight = module.weight
    bias = getattr(module, "bias", None)
    wname, _, group = entry[id(weight)]
    has_bias = isinstance(bias, nn.Parameter) and id(bias) in entry
    bias_group = entry[id(bias)][2] if has_bias else None
    return layer_block(
        mname or wname.rsplit(".", 1)[0], module, weight=weight, bias=bias if has_bias else None,
        group=group, max_factor_dim=max_factor_dim, rule=_rule(kind, has_bias, bias_group, group),
    )


def _shared_block(users: list[tuple[str, nn.Module, LayerKind]], entry: dict, max_factor_dim: int | None) -> Block:
    mname, module, kind = users[0]
    weight = module.weight
    wname, _, group = entry[id(weight)]
    base = layer_block(
        wname, module, weight=weight, bias=None, group=group, max_factor_dim=max_factor_dim,
        rule=_rule(kind, False, None, group) + f", tied: statistics from {len(users)} layers",
    )
    return SharedLayerBlock(
        name=base.name, params=base.params, shape=base.shape, factored=base.factored, layout=base.layout,
        group=base.group, rule=base.rule, kind=base.kind, module=base.module,
        uses=tuple(m for _, m, _ in users),
    )
