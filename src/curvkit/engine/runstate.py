"""The optimizer's per-step counters, kept in one shared mutable object.

Wrappers such as Lightning's ``LightningOptimizer`` copy the optimizer's attribute dict; counters
kept as plain attributes would then diverge between the copy (where ``update_curvature`` runs)
and the original (where ``step`` runs). Every per-step counter lives in one :class:`RunState`
instance instead, which a copied ``__dict__`` still shares.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["RunState"]


@dataclass
class RunState:
    """Counters of one optimizer run (all plain Python values, saved in the state dict).

    Attributes:
        step: completed ``step()`` calls (the step index ``t`` of the next step).
        stats_taken_at: the step at which statistics were last updated (-1: never).
        ever_had_stats: whether any statistics update happened.
        warm_started: ``warm_start`` ran before the first step (the first step takes none).
        pending_batches: micro-batches whose evidence is accumulated but not yet fed.
        stale_steps: statistics steps on which ``step()`` found no evidence.
    """

    step: int = 0
    stats_taken_at: int = -1
    ever_had_stats: bool = False
    warm_started: bool = False
    pending_batches: int = 0
    stale_steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for the state dict."""
        return asdict(self)

    def load(self, saved: dict[str, Any]) -> None:
        """Restore in place (the object stays shared with any copies)."""
        for key, value in saved.items():
            if hasattr(self, key):
                setattr(self, key, value)
