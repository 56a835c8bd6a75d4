"""The optimizers compared: SGD with momentum, Adam, AdamW, TNT, TNT-empirical and installed plugins.

Curvature methods are found in curvkit's registry (kind ``"method"``): the core registers
``TNT``; the plugins register ``KFAC``, ``Shampoo``, ``KBFGS`` and ``KBFGS_L``. A plugin that is
not installed is simply absent. Every preset is built the same way,
``preset(params, model=model, **settings)`` where ``params`` is ``model.parameters()`` or the
problem's param groups (``build(model, params=groups, **settings)``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["BASELINES", "MethodSpec", "PREFERRED_ORDER", "discover_methods"]

#: Display order of the methods we know; other registered presets follow alphabetically.
PREFERRED_ORDER = ("SGD-m", "Adam", "AdamW", "TNT", "TNT-empirical", "KFAC", "Shampoo", "KBFGS", "KBFGS_L")

Builder = Callable[..., torch.optim.Optimizer]


@dataclass(frozen=True)
class MethodSpec:
    """How to build one compared method.

    Attributes:
        name: its name in tables and on the command line.
        build: ``build(model, **settings) -> optimizer``; ``params=`` (param groups) replaces
            ``model.parameters()``.
        origin: where it comes from (``torch.optim`` or the registering module/distribution).
        curvature: whether it is a curvkit optimizer (``update_curvature`` is called).
    """

    name: str
    build: Callable[..., torch.optim.Optimizer]
    origin: str
    curvature: bool


def _torch(cls: type[torch.optim.Optimizer]) -> Callable[..., torch.optim.Optimizer]:
    def build(model: nn.Module, params: Any = None, **kw: Any) -> torch.optim.Optimizer:
        return cls(model.parameters() if params is None else params, **kw)

    return build


BASELINES = {
    "SGD-m": MethodSpec("SGD-m", _torch(torch.optim.SGD), "torch.optim.SGD", False),
    "Adam": MethodSpec("Adam", _torch(torch.optim.Adam), "torch.optim.Adam", False),
    "AdamW": MethodSpec("AdamW", _torch(torch.optim.AdamW), "torch.optim.AdamW", False),
}


def _preset(preset: Builder, **fixed: Any) -> Callable[..., torch.optim.Optimizer]:
    def build(model: nn.Module, params: Any = None, **kw: Any) -> torch.optim.Optimizer:
        return preset(model.parameters() if params is None else params, model=model, **{**fixed, **kw})

    return build


def discover_methods() -> tuple[dict[str, MethodSpec], list[str]]:
    """Every method available in this environment, in display order, and load problems.

    Returns:
        ``(methods, notes)``: ``methods`` maps names to specs; ``notes`` holds messages about
        plugins that failed to load (their presets are absent).
    """
    import curvkit

    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registered = curvkit.available("method")["method"]
    notes.extend(str(w.message) for w in caught if "plugin" in str(w.message))
    found: dict[str, MethodSpec] = dict(BASELINES)
    for name, origin in registered.items():
        preset = curvkit.get("method", name)
        found[name] = MethodSpec(name, _preset(preset), origin, True)
        if name == "TNT":
            found["TNT-empirical"] = MethodSpec(
                "TNT-empirical", _preset(preset, evidence="empirical"), f"{origin} (evidence='empirical')", True
            )
    known = [n for n in PREFERRED_ORDER if n in found]
    others = sorted(n for n in found if n not in PREFERRED_ORDER)
    return {n: found[n] for n in known + others}, notes
