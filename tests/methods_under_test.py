"""Every shipped method, built uniformly, for the reliability and resume tests.

Methods come from the registry (kind ``"method"``): the core's TNT (and its empirical-Fisher
ablation) and every installed plugin preset (KFAC, Shampoo, K-BFGS, ...), so a plugin that is
installed is tested here automatically.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

import curvkit
from curvkit._tree import tensors_in

# small, stable settings per method for tiny test models (name -> preset kwargs)
SETTINGS = {
    "TNT": {"lr": 1e-3, "damping": 0.1},
    "KFAC": {"lr": 1e-3, "damping": 0.3},
    "Shampoo": {"lr": 1e-3},
    "KBFGS": {"lr": 1e-2, "damping": 0.3},
    "KBFGS_L": {"lr": 1e-2, "damping": 0.3},
}


def method_names() -> list[str]:
    names = sorted(curvkit.available("method")["method"])
    return names + ["TNT-empirical"]


def build(name: str, model: nn.Module, **overrides) -> curvkit.CurvatureOptimizer:
    if name == "TNT-empirical":
        return curvkit.TNT(model.parameters(), model=model, evidence="empirical",
                           **{**SETTINGS["TNT"], **overrides})
    preset = curvkit.get("method", name)
    return preset(model.parameters(), model=model, **{**SETTINGS.get(name, {"lr": 1e-3}), **overrides})


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def train_step(model: nn.Module, opt: curvkit.CurvatureOptimizer, x: torch.Tensor, y: torch.Tensor,
               loss_fn: Callable | None = None) -> torch.Tensor:
    """One step of the uniform training loop (closure passed when the method needs one)."""
    loss_fn = loss_fn or nn.functional.cross_entropy

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    out = model(x)
    loss = loss_fn(out, y)
    opt.zero_grad()
    opt.update_curvature(out, loss="cross_entropy")
    loss.backward()
    opt.step(closure if opt.needs_closure else None)
    return loss.detach()


def state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    from curvkit.engine.checkpoint import block_states

    return tensors_in(block_states(opt.state_dict()))


def build_with_period(name: str, model: nn.Module, period: int, **overrides) -> curvkit.CurvatureOptimizer:
    """``build`` with inversions (basis refreshes) every ``period`` steps, whatever the preset
    calls that option (``invert_every``, SOAP's ``precondition_frequency``, none for Muon)."""
    for key in ("invert_every", "precondition_frequency"):
        try:
            return build(name, model, **{key: period}, **overrides)
        except (TypeError, ValueError):  # the preset has no such option
            continue
    opt = build(name, model, **overrides)
    for group in opt.param_groups:
        group["invert_every"] = period
    return opt
