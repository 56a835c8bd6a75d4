"""Walking the nested dict/list/tuple state of blocks (internal helpers)."""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

__all__ = ["map_tensors", "tensors_in"]


def tensors_in(value: Any) -> list[Tensor]:
    """Every tensor in a nested structure of dicts, lists and tuples, in a stable order."""
    out: list[Tensor] = []

    from .operators import EigenBasis

    def walk(v: Any) -> None:
        if isinstance(v, Tensor):
            out.append(v)
        elif isinstance(v, EigenBasis):
            out.extend([v.vectors, v.values])
        elif isinstance(v, dict):
            for w in v.values():
                walk(w)
        elif isinstance(v, (list, tuple)):
            for w in v:
                walk(w)

    walk(value)
    return out


def map_tensors(fn: Callable[[Tensor], Any], value: Any) -> Any:
    """A copy of a nested structure with ``fn`` applied to every tensor (other leaves kept),
    including the tensors of :class:`~curvkit.operators.EigenBasis` entries."""
    from .operators import EigenBasis

    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, EigenBasis):
        return EigenBasis(fn(value.vectors), fn(value.values), value.version)
    if isinstance(value, dict):
        return {k: map_tensors(fn, v) for k, v in value.items()}
    if isinstance(value, list):
        return [map_tensors(fn, v) for v in value]
    if isinstance(value, tuple):
        return tuple(map_tensors(fn, v) for v in value)
    return value


_LIST = "__len__"
_EIGEN = "__eigenbasis__"


def flatten_state(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested block state as one flat dict of ``"a/b/0"`` keys (torch's per-parameter layout).

    Lists and tuples record their length under ``"<path>/__len__"`` so :func:`unflatten_state`
    rebuilds them; :class:`~curvkit.operators.EigenBasis` entries become their tensors plus a
    marker. Leaves are tensors and plain Python values, so ``torch.load(weights_only=True)`` and
    :mod:`torch.distributed.checkpoint` read the result.
    """
    from .operators import EigenBasis

    out: dict[str, Any] = {}

    def walk(v: Any, path: str) -> None:
        if isinstance(v, EigenBasis):
            out[f"{path}/{_EIGEN}"] = v.version
            out[f"{path}/vectors"] = v.vectors
            out[f"{path}/values"] = v.values
        elif isinstance(v, dict):
            if not v:
                out[f"{path}/__dict__"] = 0
            for k, w in v.items():
                if not isinstance(k, str) or "/" in k:
                    raise ValueError(f"state keys must be strings without '/', got {k!r} at {path!r}")
                walk(w, f"{path}/{k}" if path else k)
        elif isinstance(v, (list, tuple)):
            out[f"{path}/{_LIST}"] = len(v)
            for i, w in enumerate(v):
                walk(w, f"{path}/{i}")
        else:
            out[path] = v

    walk(value, prefix)
    return out


def unflatten_state(flat: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten_state`."""
    from .operators import EigenBasis

    root: dict[str, Any] = {}
    for key, v in flat.items():
        parts = key.split("/")
        node = root
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v

    def build(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        if _EIGEN in node:
            return EigenBasis(node["vectors"], node["values"], int(node[_EIGEN]))
        if _LIST in node:
            return [build(node.get(str(i))) for i in range(int(node[_LIST]))]
        return {k: build(v) for k, v in node.items() if k != "__dict__"}

    return build(root)
