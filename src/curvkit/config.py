"""Validation helpers shared by the frozen dataclass configs of every part.

Each helper raises :class:`ValueError` whose message names the option, the value it got and
what would be accepted, so that a bad hyperparameter fails at construction time.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

__all__ = [
    "check_choice",
    "check_in_unit_interval",
    "check_nonnegative",
    "check_positive",
    "check_positive_int",
]


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive(name: str, value: Any) -> None:
    """Require a finite real number ``> 0``."""
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_nonnegative(name: str, value: Any) -> None:
    """Require a finite real number ``>= 0``."""
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_in_unit_interval(name: str, value: Any, *, closed_right: bool = False) -> None:
    """Require ``0 <= value < 1`` (or ``<= 1`` with ``closed_right``)."""
    ok = _is_real(value) and math.isfinite(value) and value >= 0
    ok = ok and (value <= 1 if closed_right else value < 1)
    if not ok:
        bound = "0 <= value <= 1" if closed_right else "0 <= value < 1"
        raise ValueError(f"{name} must satisfy {bound}, got {value!r}")


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    """Require an ``int >= 1`` (or ``None`` when ``allow_none``)."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an integer >= 1{extra}, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Require ``value`` to be one of ``choices``."""
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"{name} must be one of {options!r}, got {value!r}")
