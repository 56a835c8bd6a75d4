r"""Running the checks by registry name, and listing the registered parts to parametrize over."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..methods import build_part
from ..registry import KINDS, registry
from .estimators import check_estimator
from .inverters import check_inverter
from .methods import check_method
from .preconditioners import check_preconditioner

__all__ = ["check_part", "conformance_cases"]


def conformance_cases(*origins: str, kinds: Sequence[str] = KINDS) -> list[tuple[str, str]]:
    """``(kind, name)`` of every registered part whose origin starts with one of ``origins``.

    The origin is the distribution name for parts registered through an entry point (for
    example ``"curvkit-shampoo"``) and the module name otherwise (``"curvkit_shampoo.inverter"``,
    ``"curvkit.inverters.eigen"``); with no ``origins`` every registered part is listed.
    Use it to parametrize a test over all the parts of a plugin::

        @pytest.mark.parametrize("kind,name", conformance_cases("curvkit-shampoo", "curvkit_shampoo"))
        def test_conformance(kind, name):
            check_part(kind, name)
    """
    out = []
    for kind in kinds:
        for name, origin in registry.available(kind)[kind].items():
            if not origins or any(origin.startswith(o) for o in origins):
                out.append((kind, name))
    return out


def check_part(kind: str, name: str, *, options: Mapping[str, Any] | None = None, **check_options: Any) -> None:
    """Build the registered part ``kind``/``name`` with ``options`` and run its kind's check.

    Methods are checked with :func:`check_method` (``options`` go to the factory); the other
    kinds with :func:`check_estimator`, :func:`check_inverter` or :func:`check_preconditioner`,
    to which ``check_options`` are passed.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "method":
        check_method(registry.get("method", name), options=options, **check_options)
        return
    part = build_part(kind, name, options)
    check = {"estimator": check_estimator, "inverter": check_inverter, "preconditioner": check_preconditioner}[kind]
    check(part, **check_options)
