"""Property-based tests (hypothesis) over random parameter shapes, dtypes and hyperparameters.

Ranks 0 to 4, sizes 1 to 40 (total size capped so each example stays fast). Every composed
optimizer must run, keep shapes and dtypes, stay finite, and -- where a dense reference is
affordable -- take exactly the dense Kronecker-factored step.
"""

import functools
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import curvkit

shapes = st.lists(st.integers(1, 40), min_size=0, max_size=4).filter(lambda s: math.prod(s) <= 3000)
dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])
COMMON = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def dense_reference_step(p0, sampled, grad, *, lr, damping, view):
    """First TNT step, dense: P = (kron_i (U_i + eps I)^-1) vec(g), with U from one Gram."""
    g = sampled.double().reshape(view)
    k = len(view)
    total = math.prod(view)
    c = (g.pow(2).sum() / total) ** (1.0 / k)
    invs = []
    for i, d in enumerate(view):
        unf = g.movedim(i, 0).reshape(d, -1)
        u = unf @ unf.T / (c ** (k - 1) * (total // d))
        invs.append(torch.linalg.inv(u + damping * torch.eye(d, dtype=torch.float64)))
    dense = functools.reduce(torch.kron, invs)
    return p0.double() - lr * (dense @ grad.double().reshape(-1)).reshape(p0.shape)


@COMMON
@given(shape=shapes, dtype=dtypes, lr=st.floats(1e-4, 1.0), damping=st.floats(1e-3, 10.0),
       momentum=st.floats(0.0, 0.99), stat_decay=st.floats(0.0, 0.99), inverter=st.sampled_from(["damped_eigen", "cholesky"]))
def test_composed_tnt_runs_keeps_shapes_and_matches_dense(shape, dtype, lr, damping, momentum, stat_decay, inverter):
    p = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64).to(dtype))
    p0 = p.detach().clone()
    opt = curvkit.compose([p], estimator="tensor_normal", inverter=inverter, lr=lr, damping=damping,
                          momentum=momentum, estimator_options={"stat_decay": stat_decay}, max_factor_dim=None)
    sampled, grad = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    opt.update_curvature(grads=[sampled])
    p.grad = grad
    opt.step()
    assert p.shape == p0.shape and p.dtype == dtype and torch.isfinite(p).all()
    view = opt.blocks[0].shape
    if dtype == torch.float64 and math.prod(view) <= 400:
        expected = dense_reference_step(p0, sampled, grad, lr=lr, damping=damping, view=view)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-8)
    for _ in range(2):  # more steps: momentum and EMA paths
        opt.update_curvature(grads=[torch.randn(shape).to(dtype)])
        p.grad = torch.randn(shape).to(dtype)
        opt.step()
    assert torch.isfinite(p).all()


@COMMON
@given(shape=shapes, power=st.sampled_from([1.0, 0.5, "1/2k", "1/k"]), max_dim=st.sampled_from([None, 8, 30]),
       relative=st.booleans())
def test_any_shape_any_root_any_factor_limit(shape, power, max_dim, relative):
    p = torch.nn.Parameter(torch.randn(shape))
    opt = curvkit.compose([p], estimator="tensor_normal", lr=0.01,
                          inverter_options={"power": power, "relative_damping": relative}, max_factor_dim=max_dim)
    block = opt.blocks[0]
    assert all(f == (max_dim is None or d <= max_dim) for d, f in zip(block.shape, block.factored))
    for _ in range(3):
        opt.update_curvature(grads=[torch.randn(shape)])
        p.grad = torch.randn(shape)
        opt.step()
    assert p.shape == tuple(shape) and torch.isfinite(p).all()
    inverses = opt.block_state(0)["inverses"]
    assert [v is not None for v in inverses] == list(block.factored)


@COMMON
@given(shape=shapes)
def test_views_round_trip(shape):
    p = torch.nn.Parameter(torch.randn(shape))
    block = curvkit.default_block("p", p, 0, max_factor_dim=None)
    assert math.prod(block.shape) == p.numel()
    (back,) = block.from_view(block.to_view([p.detach()]))
    assert torch.equal(back, p.detach())
