"""Parameter and param-group normalisation for :class:`curvkit.CurvatureOptimizer`."""

from __future__ import annotations

from typing import Any, Iterable

from torch import Tensor, nn

from ..config import check_in_unit_interval, check_nonnegative, check_positive, check_positive_int

__all__ = ["GROUP_OPTIONS", "check_parameter", "normalise_params", "validate_group_options"]

#: Options that may differ per param group.
GROUP_OPTIONS = (
    "lr", "momentum", "dampening", "weight_decay", "damping", "curvature_every", "invert_every",
)


def validate_group_options(options: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first invalid group option."""
    if "lr" in options:
        lr = options["lr"]
        if isinstance(lr, Tensor):
            if lr.numel() != 1 or not bool(lr >= 0):
                raise ValueError(f"lr must be a number >= 0, got {lr!r}")
        else:
            check_nonnegative("lr", lr)
    if "momentum" in options:
        check_in_unit_interval("momentum", options["momentum"])
    if "dampening" in options:
        check_in_unit_interval("dampening", options["dampening"])
    if "weight_decay" in options:
        check_nonnegative("weight_decay", options["weight_decay"])
    if "damping" in options:
        check_positive("damping", options["damping"])
    for name in ("curvature_every", "invert_every"):
        if name in options:
            check_positive_int(name, options[name])


def check_parameter(p: Any, label: str) -> None:
    """Refuse what curvkit cannot optimise, naming the parameter and the fix."""
    if not isinstance(p, Tensor):
        raise ValueError(f"params must be tensors, got {type(p).__name__} for {label}")
    if not p.is_leaf:
        raise ValueError(f"parameter {label} is not a leaf tensor (can't optimise it)")
    if p.is_complex():
        raise ValueError(
            f"parameter {label} is complex ({p.dtype}); curvkit supports real floating-point "
            f"parameters only (view it as real with torch.view_as_real)"
        )
    if not p.is_floating_point():
        raise ValueError(f"parameter {label} has dtype {p.dtype}; only floating point is supported")


def normalise_params(
    params: Iterable[Any], names: dict[int, str]
) -> list[dict[str, Any]]:
    """Param groups as ``[{"params": [tensors], ...options}]``.

    Accepts an ``nn.Module`` (its named parameters), tensors, ``(name, tensor)`` pairs, or
    param-group dicts whose ``"params"`` hold either. Names found are recorded in ``names``
    (``id(param) -> name``) for messages and the block plan.
    """
    if isinstance(params, nn.Module):
        params = list(params.named_parameters())
    if isinstance(params, Tensor):
        raise ValueError("params must be an iterable of tensors or dicts, got a single Tensor")
    items = list(params)
    if not items:
        raise ValueError("params is empty: the optimizer got no parameters to optimise")
    groups = items if isinstance(items[0], dict) else [{"params": items}]
    out = []
    seen: set[int] = set()
    for gi, group in enumerate(groups):
        if not isinstance(group, dict):
            raise ValueError("params mixes dicts (param groups) and tensors; use one form")
        group = dict(group)
        raw = group["params"]
        if isinstance(raw, nn.Module):
            raw = list(raw.named_parameters())
        raw = [raw] if isinstance(raw, Tensor) else list(raw)
        plist = []
        for i, item in enumerate(raw):
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                name, p = item
                if isinstance(p, Tensor):
                    names.setdefault(id(p), name)
            else:
                p = item
            label = repr(names.get(id(p), f"{i} of group {gi}")) if isinstance(p, Tensor) else f"{i} of group {gi}"
            check_parameter(p, label)
            if id(p) in seen:
                raise ValueError(f"parameter {label} appears more than once in params; pass each parameter once")
            seen.add(id(p))
            plist.append(p)
        group["params"] = plist
        group.pop("param_names", None)
        validate_group_options({k: v for k, v in group.items() if k in GROUP_OPTIONS})
        out.append(group)
    return out
