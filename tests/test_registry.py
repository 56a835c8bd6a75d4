"""Registry: names, errors, duplicates, test-registered parts, entry-point discovery."""

import importlib.metadata
import sys
import types
from dataclasses import dataclass

import pytest
import torch

import curvkit
from curvkit.registry import Registry


def test_core_parts_are_registered_with_origin():
    avail = curvkit.available()
    assert avail["estimator"]["tensor_normal"].startswith("curvkit")
    assert {"kronecker_mode", "identity"} <= set(avail["preconditioner"])
    assert {"damped_eigen", "cholesky", "identity"} <= set(avail["inverter"])
    assert "TNT" in avail["method"]


def test_unknown_name_lists_known_names_and_suggests():
    with pytest.raises(curvkit.UnknownPartError) as err:
        curvkit.get("inverter", "damped_eigne")
    msg = str(err.value)
    assert "damped_eigen" in msg and "cholesky" in msg and "Did you mean 'damped_eigen'" in msg


def test_unknown_plugin_name_names_the_package_to_install():
    reg = Registry()
    reg._plugins_loaded = True  # as if no plugin were installed
    with pytest.raises(LookupError, match="pip install curvkit-kfac"):
        reg.get("estimator", "kfac")
    with pytest.raises(ValueError, match="curvkit-shampoo"):
        reg.get("inverter", "coupled_newton")


def test_duplicate_name_raises_unless_replace():
    reg = Registry()
    reg._plugins_loaded = True

    class A:
        pass

    class B:
        pass

    reg.register("inverter", "x", A)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("inverter", "x", B)
    reg.register("inverter", "x", B, replace=True)
    assert reg.get("inverter", "x") is B
    with pytest.raises(ValueError, match="kind must be one of"):
        reg.register("optimizer", "x", A)
    with pytest.raises(ValueError, match="identifier"):
        reg.register("inverter", "not a name", A)


@dataclass(frozen=True)
class _ScaledConfig(curvkit.PartConfig):
    scale: float = 2.0


def test_part_registered_in_a_test_module_is_usable_by_name():
    @curvkit.register("inverter", "test_scaled_inverse", replace=True)
    class ScaledInverse(curvkit.Inverter):
        """(scale * (U + eps I))^-1: a test part."""

        Config = _ScaledConfig

        def invert(self, matrices, *, damping, order):
            eye = torch.eye(matrices.shape[-1], dtype=matrices.dtype)
            return torch.linalg.inv(self.config.scale * (matrices + damping[:, None, None] * eye))

    try:
        model = torch.nn.Linear(4, 3).double()
        grads = [torch.randn_like(p) for p in model.parameters()]
        results = []
        for inv, opts in (("damped_eigen", {}), ("test_scaled_inverse", {"scale": 2.0})):
            m = torch.nn.Linear(4, 3).double()
            m.load_state_dict(model.state_dict())
            opt = curvkit.compose(m.parameters(), estimator="tensor_normal", inverter=inv,
                                  inverter_options=opts, lr=0.1, momentum=0.0)
            opt.update_curvature(grads=grads)
            for p, g in zip(m.parameters(), grads):
                p.grad = g
            before = [p.detach().clone() for p in m.parameters()]
            opt.step()
            results.append([b - p.detach() for b, p in zip(before, m.parameters())])
        # each mode's inverse is halved: 1/4 of the step for the 2-mode weight, 1/2 for the bias
        for a, b, k in zip(*results, (2, 1)):
            torch.testing.assert_close(b, a / 2**k, rtol=1e-5, atol=1e-7)
    finally:
        curvkit.registry.unregister("inverter", "test_scaled_inverse")


def test_entry_point_discovery(monkeypatch):
    module = types.ModuleType("curvkit_fakeplugin")

    def register_parts(reg):
        reg.register("preconditioner", "fake_identity", curvkit.IdentityPreconditioner)

    module.register_parts = register_parts
    monkeypatch.setitem(sys.modules, "curvkit_fakeplugin", module)
    ep = importlib.metadata.EntryPoint(name="fake", value="curvkit_fakeplugin:register_parts", group="curvkit.plugins")

    def fake_entry_points(group=None, **kw):
        return [ep] if group == "curvkit.plugins" else []

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    reg = Registry()
    assert reg.get("preconditioner", "fake_identity") is curvkit.IdentityPreconditioner
    assert "fake_identity" in reg.available("preconditioner")["preconditioner"]


def test_broken_plugin_warns_and_is_reported(monkeypatch):
    ep = importlib.metadata.EntryPoint(name="broken", value="curvkit_no_such_module_xyz", group="curvkit.plugins")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None, **kw: [ep])
    reg = Registry()
    with pytest.warns(RuntimeWarning, match="failed to load"):
        reg.load_plugins()
    with pytest.raises(LookupError, match="failed to load"):
        reg.get("estimator", "nothing_here")


def test_composition_is_real_shampoo_root_differs_from_tnt_inverse():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    finals = []
    for inverter_options in ({"power": 1.0}, {"power": "1/2k"}):
        m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        m.load_state_dict(model.state_dict())
        opt = curvkit.compose(m.parameters(), estimator="tensor_normal", preconditioner="kronecker_mode",
                              inverter="damped_eigen", inverter_options=inverter_options, lr=0.01, seed=0)
        for _ in range(5):
            out = m(x)
            loss = torch.nn.functional.cross_entropy(out, y)
            opt.zero_grad()
            opt.update_curvature(out, loss="cross_entropy")
            loss.backward()
            opt.step()
        assert all(torch.isfinite(p).all() for p in m.parameters())
        finals.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert (finals[0] - finals[1]).abs().max() > 1e-4


def test_compose_errors():
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(LookupError, match="Known estimators"):
        curvkit.compose(p, estimator="nope")
    with pytest.raises(ValueError, match="inverter_options"):
        curvkit.compose(p, estimator="tensor_normal", inverter=curvkit.DampedEigen(), inverter_options={"power": 2})
