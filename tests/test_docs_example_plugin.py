"""The worked example plugin of docs/howto/plugin.rst: it loads through its declared entry point,
composes by name, and its parts match brute-force and dense references."""

from __future__ import annotations

import importlib.metadata
import itertools
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import curvkit
from curvkit import BlockEvidence, default_block
from curvkit.registry import Registry

PLUGIN = Path(__file__).resolve().parents[1] / "docs" / "examples" / "plugin_example"
NAMES = [("estimator", "mode_diagonal"), ("inverter", "diagonal_power"), ("method", "DiagonalShampoo")]

sys.path.insert(0, str(PLUGIN / "src"))
import curvkit_example  # noqa: E402
from curvkit_example import DiagonalPower, DiagonalShampoo, ModeDiagonal  # noqa: E402


def _entry_point() -> importlib.metadata.EntryPoint:
    project = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]
    (name, value), = project["entry-points"][curvkit.ENTRY_POINT_GROUP].items()
    return importlib.metadata.EntryPoint(name=name, value=value, group=curvkit.ENTRY_POINT_GROUP)


@pytest.fixture
def registered():
    """The plugin's parts in the global registry for one test, removed afterwards."""
    present = {(kind, name) for kind, name in NAMES if name in curvkit.available(kind)[kind]}
    _entry_point().load()(curvkit.registry)  # a no-op for names an installed copy registered
    yield
    for kind, name in NAMES:
        if (kind, name) not in present:
            curvkit.registry.unregister(kind, name)


def test_declared_entry_point_registers_every_part():
    register = _entry_point().load()
    assert register is curvkit_example.register_parts
    fresh = Registry()
    register(fresh)
    assert fresh.get("estimator", "mode_diagonal") is ModeDiagonal
    assert fresh.get("inverter", "diagonal_power") is DiagonalPower
    assert fresh.get("method", "DiagonalShampoo") is DiagonalShampoo
    assert ModeDiagonal.name == "mode_diagonal" and DiagonalPower.name == "diagonal_power"


def test_pip_installed_plugin_is_discovered(tmp_path):
    """pip-install the package (no network, no build isolation) into a target directory and check
    that a fresh interpreter finds its names through importlib.metadata entry points alone."""
    source = tmp_path / "src"
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        check=True, capture_output=True,
    )
    code = (
        "import curvkit; a = curvkit.available(); "
        "print(a['estimator']['mode_diagonal'], a['inverter']['diagonal_power'], a['method']['DiagonalShampoo'])"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    assert out.stdout.split() == ["curvkit-example"] * 3


def test_compose_by_name(registered):
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    opt = curvkit.compose(model.parameters(), estimator="mode_diagonal", inverter="diagonal_power",
                          inverter_options={"power": 0.5}, lr=1e-2, damping=1e-3)
    assert isinstance(opt.estimator, ModeDiagonal) and opt.inverter.config.power == 0.5
    preset = curvkit.get("method", "DiagonalShampoo")(model.parameters(), lr=1e-2)
    assert type(preset.estimator) is ModeDiagonal and preset.inverter.config.power == "1/2k"
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        preset.zero_grad()
        loss.backward()
        preset.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert all(v == 0 for counters in preset.health().values() for v in counters.values())


def _loop_diagonals(g: torch.Tensor) -> list[torch.Tensor]:
    """Per-mode sums of squares by explicit loops over every index (the reference)."""
    out = [torch.zeros(d, dtype=torch.float64) for d in g.shape]
    for index in itertools.product(*(range(d) for d in g.shape)):
        value = float(g[index]) ** 2
        for mode, a in enumerate(index):
            out[mode][a] += value
    return out


def test_statistics_match_loops_with_ema():
    weight = torch.nn.Parameter(torch.zeros(3, 2, 2, 2, dtype=torch.float64))  # conv: view (3, 2, 4)
    block = default_block("w", weight, 0, max_factor_dim=None)
    assert block.shape == (3, 2, 4)
    est = ModeDiagonal(stat_decay=0.7)
    state = est.init_state(block)
    expected = None
    for _ in range(3):
        g = torch.randn(3, 2, 2, 2, dtype=torch.float64)
        est.update(block, state, BlockEvidence(gradients=[g]))
        fresh = _loop_diagonals(g.reshape(3, 2, 4))
        expected = fresh if expected is None else [0.7 * e + 0.3 * f for e, f in zip(expected, fresh)]
        for got, want in zip(state["diagonals"], expected):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    factors = est.factors(block, state, damping=0.5)
    for factor, want in zip(factors, expected):
        torch.testing.assert_close(factor.matrix, torch.diag(want), rtol=1e-12, atol=1e-12)
        assert factor.damping == 0.5
    # the explicit-decay form (warm start): decay=0.25 -> 0.25 S + 0.75 S_hat
    g = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    est.update(block, state, BlockEvidence(gradients=[g]), decay=0.25)
    for got, old, new in zip(state["diagonals"], expected, _loop_diagonals(g.reshape(3, 2, 4))):
        torch.testing.assert_close(got, 0.25 * old + 0.75 * new, rtol=1e-12, atol=1e-12)


def test_unfactored_mode_keeps_no_statistic():
    weight = torch.nn.Parameter(torch.zeros(50, 3, dtype=torch.float64))
    block = default_block("w", weight, 0, max_factor_dim=10)
    est = ModeDiagonal()
    state = est.init_state(block)
    est.update(block, state, BlockEvidence(gradients=[torch.randn(50, 3, dtype=torch.float64)]))
    factors = est.factors(block, state, damping=1.0)
    assert factors[0] is None and factors[1].matrix.shape == (3, 3)


@pytest.mark.parametrize("power,order", [(1.0, 2), ("1/2k", 2), ("1/2k", 3), (0.5, 1)])
def test_inverter_matches_dense_reference(power, order):
    d, eps = 5, 0.3
    a = torch.randn(4, d, d, dtype=torch.float64)
    matrices = a @ a.transpose(-1, -2)
    before = matrices.clone()
    out = DiagonalPower(power=power).invert(matrices, damping=torch.full((4,), eps, dtype=torch.float64),
                                            order=torch.full((4,), order))
    assert torch.equal(matrices, before)
    p = 1 / (2 * order) if power == "1/2k" else power
    reps = round(1 / p)  # V^(1/p) must be the inverse of the damped diagonal part
    eye = torch.eye(d, dtype=torch.float64)
    for v, m in zip(out, matrices):
        damped = torch.diag(torch.diagonal(m)) + eps * eye
        torch.testing.assert_close(torch.linalg.matrix_power(v, reps), torch.linalg.inv(damped),
                                   rtol=1e-10, atol=1e-12)


def test_direction_matches_dense_kronecker(registered):
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 4, bias=False).double()
    lr, eps = 0.1, 0.2
    opt = DiagonalShampoo(layer.parameters(), lr=lr, damping=eps, momentum=0.0)
    x = torch.randn(8, 3, dtype=torch.float64)
    before = layer.weight.detach().clone()
    layer(x).pow(2).mean().backward()
    g = layer.weight.grad.detach().clone()
    opt.step()
    r1, r2 = _loop_diagonals(g)
    v1 = torch.diag((r1 + eps) ** -0.25)
    v2 = torch.diag((r2 + eps) ** -0.25)
    direction = (torch.kron(v1, v2) @ g.reshape(-1)).reshape(4, 3)  # row-major vec
    torch.testing.assert_close(layer.weight.detach(), before - lr * direction, rtol=1e-12, atol=1e-12)


def test_options_are_validated_with_the_option_named():
    with pytest.raises(ValueError, match="stat_decay"):
        ModeDiagonal(stat_decay=1.0)
    with pytest.raises(ValueError, match="evidence"):
        ModeDiagonal(evidence="labels")
    with pytest.raises(ValueError, match="power"):
        DiagonalPower(power="1/k")
    with pytest.raises(ValueError, match="power"):
        DiagonalPower(power=-1.0)


def test_conformance_suite(registered):
    from curvkit.testing import check_estimator, check_inverter, check_method

    check_inverter(DiagonalPower())
    check_inverter(DiagonalPower(power=1.0))
    check_estimator(ModeDiagonal(), inverter="diagonal_power")
    check_estimator(ModeDiagonal(evidence="sampled"), inverter="diagonal_power")
    check_method(DiagonalShampoo)
