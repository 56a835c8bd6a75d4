"""Entry-point discovery, the install hint, the KFAC preset and config validation."""

import importlib.metadata
import subprocess
import sys

import pytest
import torch
from torch import nn

import curvkit
import curvkit_kfac
from curvkit.registry import Registry


def test_compose_resolves_kfac_through_the_entry_point_without_importing_the_plugin():
    code = (
        "import sys, torch, curvkit\n"
        "model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))\n"
        "assert 'curvkit_kfac' not in sys.modules\n"
        "opt = curvkit.compose(model.parameters(), estimator='kfac', model=model, lr=1e-2)\n"
        "assert type(opt.estimator).__module__ == 'curvkit_kfac.estimator'\n"
        "print(curvkit.available('method')['method']['KFAC'], curvkit.available('estimator')['estimator']['kfac'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["curvkit-kfac", "curvkit-kfac"]


def test_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group=curvkit.ENTRY_POINT_GROUP)
    assert any(ep.name == "kfac" and ep.value == "curvkit_kfac" for ep in eps)


def test_unknown_kfac_name_names_the_plugin_package(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None, **kw: [])
    reg = Registry()  # as if the plugin were not installed
    with pytest.raises(curvkit.UnknownPartError, match="pip install curvkit-kfac"):
        reg.get("estimator", "kfac")


def test_preset_defaults_are_the_papers_mnist_settings():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = curvkit.get("method", "KFAC")(model.parameters(), model=model)
    group = opt.param_groups[0]
    assert (group["lr"], group["damping"], group["momentum"], group["weight_decay"]) == (3e-3, 0.3, 0.9, 0.0)
    assert (group["curvature_every"], group["invert_every"]) == (1, 20)
    assert opt.estimator.config == curvkit_kfac.KFACConfig(stat_decay=0.9, evidence="sampled")
    assert opt.preconditioner.name == "kronecker_mode"
    assert opt.inverter.name == "damped_eigen" and opt.inverter.config.power == 1.0
    same = curvkit_kfac.KFAC(model, lr=1e-2, inverter="cholesky")
    assert same.model is model and same.inverter.name == "cholesky" and same.param_groups[0]["lr"] == 1e-2
    assert [p for p in same.param_groups[0]["params"]] == list(model.parameters())


def test_preset_rejects_bad_arguments():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="different model"):
        curvkit_kfac.KFAC(model, model=nn.Linear(3, 2))
    with pytest.raises(ValueError, match="inverter"):
        curvkit_kfac.KFAC(model, inverter="coupled_newton")
    with pytest.raises(ValueError, match="damping"):
        curvkit_kfac.KFAC(model, damping=0.0)


@pytest.mark.parametrize(
    "option,value",
    [("stat_decay", 1.0), ("stat_decay", -0.1), ("evidence", "true"), ("pi_damping", 1),
     ("fallback", "identity"), ("gradient_scale", 0.0), ("gradient_scale", float("nan"))],
)
def test_config_validation_names_the_option(option, value):
    with pytest.raises(ValueError, match=option):
        curvkit_kfac.KFACConfig(**{option: value})
    with pytest.raises(ValueError, match=option):
        curvkit.compose(nn.Linear(2, 2).parameters(), estimator="kfac", estimator_options={option: value},
                        model=nn.Linear(2, 2))


def test_saved_state_must_fit_the_blocks():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = curvkit_kfac.KFAC(model)
    out = model(torch.randn(5, 3))
    opt.update_curvature(out, loss="mse")
    out.sum().backward()
    opt.step()
    sd = opt.state_dict()
    from curvkit.engine.checkpoint import block_states, set_block_state

    a, b = block_states(sd)[:2]
    a["estimator"], b["estimator"] = b["estimator"], a["estimator"]
    set_block_state(sd, 0, a)
    set_block_state(sd, 1, b)
    with pytest.raises(ValueError, match="does not fit"):
        curvkit_kfac.KFAC(model).load_state_dict(sd)
