"""Same-trace normalisation identities and the EMA rule of the tensor_normal estimator."""

import functools

import pytest
import torch

import curvkit
from curvkit.blocks import default_block
from curvkit.interfaces import BlockEvidence


@pytest.mark.parametrize("shape", [(6,), (5, 3), (4, 3, 2), (3, 2, 2, 2)])
def test_same_trace_identities(shape):
    p = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    block = default_block("p", p, 0, max_factor_dim=None)
    est = curvkit.TensorNormal()
    state = est.init_state(block)
    for _ in range(3):
        est.update(block, state, BlockEvidence([torch.randn(shape, dtype=torch.float64)]))
    factors = est.factors(block, state, damping=0.1)
    u = [f.matrix for f in factors]
    s = state["grams"]
    k = block.order
    # equal average eigenvalues c across modes
    averages = torch.stack([torch.trace(ui) / ui.shape[0] for ui in u])
    torch.testing.assert_close(averages, averages[0].expand_as(averages), rtol=1e-12, atol=0)
    # U_1 x ... x U_k = (S_1 x ... x S_k) / tr(S)^(k-1)
    lhs = functools.reduce(torch.kron, u)
    rhs = functools.reduce(torch.kron, s) / torch.trace(s[0]) ** (k - 1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-12)
    # every mode Gram has the same trace
    traces = torch.stack([torch.trace(si) for si in s])
    torch.testing.assert_close(traces, traces[0].expand_as(traces), rtol=1e-12, atol=0)


def test_first_update_sets_then_ema():
    p = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    block = default_block("p", p, 0, max_factor_dim=None)
    est = curvkit.TensorNormal(stat_decay=0.7)
    state = est.init_state(block)
    assert est.factors(block, state, damping=0.1) is None
    g1, g2 = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    est.update(block, state, BlockEvidence([g1]))
    torch.testing.assert_close(state["grams"][0], g1 @ g1.T)
    est.update(block, state, BlockEvidence([g2]))
    torch.testing.assert_close(state["grams"][1], 0.7 * g1.T @ g1 + 0.3 * g2.T @ g2)


def test_zero_gradient_gives_finite_factors():
    p = torch.nn.Parameter(torch.zeros(4, 3))
    block = default_block("p", p, 0, max_factor_dim=None)
    est = curvkit.TensorNormal()
    state = est.init_state(block)
    est.update(block, state, BlockEvidence([torch.zeros(4, 3)]))
    for f in est.factors(block, state, damping=0.1):
        assert torch.isfinite(f.matrix).all()


def test_max_factor_dim_leaves_large_modes_unfactored():
    p = torch.nn.Parameter(torch.zeros(50, 3))
    block = default_block("p", p, 0, max_factor_dim=10)
    assert block.factored == (False, True)
    est = curvkit.TensorNormal()
    state = est.init_state(block)
    est.update(block, state, BlockEvidence([torch.randn(50, 3)]))
    factors = est.factors(block, state, damping=0.1)
    assert factors[0] is None and factors[1].matrix.shape == (3, 3)


@pytest.mark.parametrize(
    "shape,view",
    [((), (1,)), ((7,), (7,)), ((4, 5), (4, 5)), ((4, 3, 3, 3), (4, 3, 9)), ((4, 1, 1, 1), (4,)),
     ((2, 3, 4), (2, 3, 4)), ((2, 3, 2, 2, 2), (2, 3, 8)), ((1, 1), (1,))],
)
def test_view_rules(shape, view):
    assert curvkit.view_shape_for(shape)[0] == view


@pytest.mark.parametrize("bad", [{"stat_decay": 1.0}, {"stat_decay": -0.1}, {"evidence": "true"}, {"normalize": 1}])
def test_invalid_config(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        curvkit.TensorNormal(**bad)
