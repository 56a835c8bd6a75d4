r"""The ``partition`` preconditioner: a label per block, a preconditioner per label.

Like ``optax.multi_transform``, a label function maps each block to a label and each label to
a preconditioner (by registered name, with options), so one optimizer can run, say, Muon on
hidden-layer matrices and AdamW on everything else (embeddings, biases, norm scales, an output
head). Built-in label rules (``label=``), each giving ``"modelled"`` or ``"unmodelled"``:

* ``"matrix"``: blocks whose view has at least two modes (matrices; convolution weights, which
  Muon flattens), unless their name matches an ``unmodelled`` pattern;
* ``"factored"``: curvature blocks (``kind == "kronecker"``) with at least one factored mode,
  unless their name matches an ``unmodelled`` pattern; blocks a method has no curvature model
  of (fallback blocks, all modes unfactored) are ``"unmodelled"``.

``label`` may also be a callable ``block -> label``. Patterns are ``fnmatch`` patterns on the
block name (the parameter or module name), for example ``("embed*", "head.*")``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from torch import Tensor

from ..blocks import Block
from ..interfaces import PartConfig, Preconditioner
from ..registry import register, registry

__all__ = ["Partition", "PartitionConfig", "label_block"]

_RULES = ("matrix", "factored")


def label_block(rule: str, block: Block, unmodelled: Sequence[str] = ()) -> str:
    """The label of ``block`` under a built-in ``rule`` (``"modelled"`` or ``"unmodelled"``)."""
    if any(fnmatch.fnmatchcase(block.name, pat) for pat in unmodelled):
        return "unmodelled"
    if rule == "matrix":
        return "modelled" if block.order >= 2 else "unmodelled"
    return "modelled" if block.kind == "kronecker" and any(block.factored) else "unmodelled"


@dataclass(frozen=True)
class PartitionConfig(PartConfig):
    """Options of :class:`Partition`.

    Attributes:
        label: a built-in rule (``"matrix"`` or ``"factored"``) or a callable ``block -> label``.
        preconditioners: registered preconditioner name per label.
        options: keyword options per label (for that label's preconditioner).
        unmodelled: block-name patterns that always get the label ``"unmodelled"``.
    """

    label: str | Callable[[Block], str] = "matrix"
    preconditioners: Mapping[str, str] = field(
        default_factory=lambda: {"modelled": "muon", "unmodelled": "adamw"}
    )
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    unmodelled: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not callable(self.label) and self.label not in _RULES:
            raise ValueError(f"label must be one of {_RULES} or a callable block -> label, got {self.label!r}")
        if not isinstance(self.preconditioners, Mapping) or not self.preconditioners:
            raise ValueError(
                f"preconditioners must be a non-empty mapping label -> preconditioner name, got {self.preconditioners!r}"
            )
        for label, name in self.preconditioners.items():
            if not isinstance(name, str):
                raise ValueError(f"preconditioners[{label!r}] must be a registered name, got {name!r}")
            if name == "partition":
                raise ValueError(f"preconditioners[{label!r}] = 'partition': partitions do not nest")
        if not callable(self.label):
            missing = sorted({"modelled", "unmodelled"} - set(self.preconditioners))
            if missing:
                raise ValueError(
                    f"preconditioners has no entry for label(s) {missing} that rule {self.label!r} produces; "
                    f"give one preconditioner name per label"
                )
        unknown = sorted(set(self.options) - set(self.preconditioners))
        if unknown:
            raise ValueError(f"options has label(s) {unknown} without a preconditioner; labels are {sorted(self.preconditioners)}")
        if isinstance(self.unmodelled, str) or not all(isinstance(p, str) for p in self.unmodelled):
            raise ValueError(f"unmodelled must be a tuple of name patterns, got {self.unmodelled!r}")
        object.__setattr__(self, "unmodelled", tuple(self.unmodelled))

    def to_dict(self) -> dict[str, Any]:
        """Plain values (a callable label is stored by its qualified name)."""
        label = self.label if isinstance(self.label, str) else getattr(self.label, "__qualname__", repr(self.label))
        return {
            "label": label,
            "preconditioners": dict(self.preconditioners),
            "options": {k: dict(v) for k, v in self.options.items()},
            "unmodelled": list(self.unmodelled),
        }


@register("preconditioner", "partition")
class Partition(Preconditioner):
    """Sends each block to the preconditioner of its label."""

    Config = PartitionConfig

    def __init__(self, config: PartitionConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.parts: dict[str, Preconditioner] = {}
        for label, name in self.config.preconditioners.items():
            part = registry.get("preconditioner", name)(**dict(self.config.options.get(label, {})))
            if not isinstance(part, Preconditioner):
                raise ValueError(f"preconditioners[{label!r}] = {name!r} is not a Preconditioner")
            self.parts[label] = part
        kinds = None
        for part in self.parts.values():
            kinds = set(part.accepts) if kinds is None else kinds & set(part.accepts)
        self.accepts = tuple(k for k in ("matrix", "eigenbasis", "operator") if k in (kinds or set()))

    def label(self, block: Block) -> str:
        """The label of a block."""
        cfg = self.config
        if callable(cfg.label):
            label = cfg.label(block)
            if any(fnmatch.fnmatchcase(block.name, pat) for pat in cfg.unmodelled):
                label = "unmodelled"
        else:
            label = label_block(cfg.label, block, cfg.unmodelled)
        if label not in self.parts:
            raise ValueError(
                f"block {block.name!r} got label {label!r}, which has no preconditioner; labels are {sorted(self.parts)}"
            )
        return label

    def init_state(self, block: Block) -> dict[str, Any]:
        label = self.label(block)
        return {"label": label, "inner": self.parts[label].init_state(block)}

    def describe(self, block: Block) -> str:
        """What the block gets (its label and its preconditioner's description)."""
        label = self.label(block)
        part = self.parts[label]
        inner = part.describe(block) if hasattr(part, "describe") else part.name
        return f"{label}: {inner}"

    def apply_group(
        self,
        blocks: Sequence[Block],
        states: Sequence[dict[str, Any]],
        directions: Sequence[Tensor],
        inverses: Sequence[Sequence[Any] | None],
        *,
        gradients: Sequence[Tensor],
    ) -> list[Tensor]:
        """Split the group by label and hand each part its sub-group (in one call each)."""
        by_label: dict[str, list[int]] = {}
        for i, s in enumerate(states):
            by_label.setdefault(s["label"], []).append(i)
        out: list[Tensor | None] = [None] * len(blocks)
        for label, idx in by_label.items():
            results = self.parts[label].apply_group(
                [blocks[i] for i in idx], [states[i]["inner"] for i in idx], [directions[i] for i in idx],
                [inverses[i] for i in idx], gradients=[gradients[i] for i in idx],
            )
            for i, r in zip(idx, results):
                out[i] = r
        return out  # type: ignore[return-value]

    def apply(
        self,
        block: Block,
        state: dict[str, Any],
        direction: Tensor,
        inverses: Sequence[Any] | None,
        *,
        gradient: Tensor,
    ) -> Tensor:
        return self.parts[state["label"]].apply(block, state["inner"], direction, inverses, gradient=gradient)
