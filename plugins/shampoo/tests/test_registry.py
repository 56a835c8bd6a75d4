"""Discovery through the entry point, registration and config validation."""

import importlib.metadata
import subprocess
import sys

import pytest
import torch

import curvkit
import curvkit_shampoo


def test_names_resolve_through_the_entry_point_without_importing_the_plugin():
    code = """
import sys
import torch
import curvkit
assert "curvkit_shampoo" not in sys.modules
w = torch.nn.Parameter(torch.randn(3, 2))
opt = curvkit.compose([w], estimator="shampoo", preconditioner="grafted_kronecker",
                      inverter="coupled_newton", lr=0.1)
w.grad = torch.randn(3, 2)
opt.step()
print(type(opt.estimator).__module__, type(opt.inverter).__module__,
      curvkit.available("method")["method"]["Shampoo"], curvkit.available("estimator")["estimator"]["shampoo"])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        "curvkit_shampoo.estimator", "curvkit_shampoo.coupled_newton", "curvkit-shampoo", "curvkit-shampoo",
    ]


def test_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group=curvkit.ENTRY_POINT_GROUP)
    assert any(ep.name == "shampoo" and ep.value == "curvkit_shampoo" for ep in eps)


def test_parts_and_preset_are_registered():
    assert curvkit.get("estimator", "shampoo") is curvkit_shampoo.ShampooStatistics
    assert curvkit.get("inverter", "coupled_newton") is curvkit_shampoo.CoupledNewton
    assert curvkit.get("preconditioner", "grafted_kronecker") is curvkit_shampoo.GraftedKronecker
    assert curvkit.get("method", "Shampoo") is curvkit_shampoo.Shampoo
    assert "Shampoo" in curvkit.available("method")["method"]


def test_coupled_newton_serves_other_compositions():
    """The inverter is a part of its own: TNT statistics with Newton inverses (power 1)."""
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    v = torch.nn.Parameter(w.detach().clone())
    a = curvkit.compose([w], estimator="tensor_normal", inverter="coupled_newton",
                        inverter_options={"power": 1.0}, estimator_options={"evidence": "empirical"}, lr=0.1)
    b = curvkit.compose([v], estimator="tensor_normal", inverter="damped_eigen",
                        estimator_options={"evidence": "empirical"}, lr=0.1)
    for _ in range(3):
        g = torch.randn(4, 3, dtype=torch.float64)
        w.grad, v.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert torch.allclose(w, v, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "options, message",
    [({"stat_decay": 1.0}, "stat_decay"), ({"accumulate": "mean"}, "accumulate must be one of"),
     ({"block_size": 0}, "block_size"), ({"root_solver": "svd"}, "root_solver must be one of")],
)
def test_invalid_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        curvkit_shampoo.Shampoo([torch.nn.Parameter(torch.zeros(2, 2))], **options)


def test_root_solver_follows_the_device():
    import curvkit_shampoo

    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = curvkit_shampoo.Shampoo([w])
    assert opt.inverter.name == "damped_eigen"  # CPU: one eigh per factor
    opt = curvkit_shampoo.Shampoo(iter([{"params": iter([w])}]))  # generators are read once
    assert opt.inverter.name == "damped_eigen" and opt.param_groups[0]["params"] == [w]
    opt = curvkit_shampoo.Shampoo([w], root_solver="coupled_newton")
    assert opt.inverter.name == "coupled_newton" and opt.inverter.config.float64 is False
    assert curvkit_shampoo.Shampoo([w], root_solver="coupled_newton", root_float64=True).inverter.config.float64
    if torch.cuda.is_available():
        assert curvkit_shampoo.Shampoo([torch.nn.Parameter(w.detach().cuda())]).inverter.name == "coupled_newton"
    with pytest.raises(ValueError, match="root_float64"):
        curvkit_shampoo.Shampoo([w], root_float64="yes")
