"""Walking the nested dict/list/tuple state of blocks (internal helpers)."""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

__all__ = ["map_tensors", "tensors_in"]


def tensors_in(value: Any) -> list[Tensor]:
    """Every tensor in a nested structure of dicts, lists and tuples, in a stable order."""
    out: list[Tensor] = []

    def walk(v: Any) -> None:
        if isinstance(v, Tensor):
            out.append(v)
        elif isinstance(v, dict):
            for w in v.values():
                walk(w)
        elif isinstance(v, (list, tuple)):
            for w in v:
                walk(w)

    walk(value)
    return out


def map_tensors(fn: Callable[[Tensor], Any], value: Any) -> Any:
    """A copy of a nested structure with ``fn`` applied to every tensor (other leaves kept)."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_tensors(fn, v) for k, v in value.items()}
    if isinstance(value, list):
        return [map_tensors(fn, v) for v in value]
    if isinstance(value, tuple):
        return tuple(map_tensors(fn, v) for v in value)
    return value
