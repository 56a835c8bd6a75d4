"""Shampoo's update equals a dense float64 reference: explicit Kronecker products of scipy roots."""

import pytest
import torch
from shampoo_reference import ReferenceShampoo

import curvkit
from curvkit_shampoo import Shampoo

SHAPES = [(4, 5), (4,), (3, 2, 2, 2)]  # matrix, vector, conv weight viewed as (3, 2, 4)


def run(opt_kwargs, ref_kwargs, *, steps, tol):
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in SHAPES]
    opt = Shampoo(params, **opt_kwargs)
    views = [b.shape for b in opt.blocks]
    assert views == [(4, 5), (4,), (3, 2, 4)]
    refs = [ReferenceShampoo(v, **ref_kwargs) for v in views]
    expected = [p.detach().clone().reshape(v) for p, v in zip(params, views)]
    for t in range(steps):
        grads = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, (p, g, v, ref) in enumerate(zip(params, grads, views, refs)):
            expected[i] = ref.step(expected[i], g.reshape(v))
            err = (p.detach().reshape(v) - expected[i]).abs().max() / expected[i].abs().max()
            assert err < tol, f"step {t}, param {SHAPES[i]}: relative error {err:.2e}"


@pytest.mark.parametrize("root_solver", ["coupled_newton", "eigen"])
@pytest.mark.parametrize("accumulate", ["ema", "sum"])
def test_direction_is_the_dense_kronecker_product_of_inverse_roots(root_solver, accumulate):
    # lr large enough that a wrong direction moves the parameters far more than the tolerance
    opts = dict(lr=0.1, damping=1e-2, momentum=0.9, curvature_every=1, invert_every=3)
    run({**opts, "root_solver": root_solver, "accumulate": accumulate},
        dict(lr=0.1, eps=1e-2, momentum=0.9, t1=1, t2=3, accumulate=accumulate), steps=7, tol=1e-9)


def test_schedules_relative_epsilon_and_weight_decay_match_the_reference():
    opts = dict(lr=0.05, damping=1e-3, momentum=0.5, curvature_every=2, invert_every=5,
                relative_damping=True, weight_decay=0.1, stat_decay=0.7)
    ref = dict(lr=0.05, eps=1e-3, momentum=0.5, t1=2, t2=5, relative=True, weight_decay=0.1, stat_decay=0.7)
    run(opts, ref, steps=11, tol=1e-7)  # power-method lambda_max: ~1e-9 relative on these sizes


def test_defaults_are_the_tnt_authors_settings():
    opt = Shampoo([torch.nn.Parameter(torch.zeros(3, 2))])
    group = opt.param_groups[0]
    assert (group["lr"], group["damping"], group["momentum"]) == (3e-4, 3e-4, 0.9)
    assert (group["curvature_every"], group["invert_every"]) == (1, 20)
    assert opt.estimator.config.stat_decay == 0.9 and opt.estimator.config.accumulate == "ema"
    assert opt.preconditioner.name == "kronecker_mode"  # no grafting by default
    # root solver by device: one eigh per factor on CPU (coupled Newton on CUDA, test_registry.py)
    assert opt.inverter.name == "damped_eigen" and opt.inverter.config.power == "1/2k"


def test_model_names_the_blocks_and_compose_by_name_is_the_same_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    opt = Shampoo(model.parameters(), model=model)
    assert [b.name for b in opt.blocks] == ["0.weight", "0.bias"]
    composed = curvkit.compose(model.parameters(), estimator="shampoo", inverter="damped_eigen",
                               inverter_options={"power": "1/2k"}, lr=3e-4, damping=3e-4)
    from curvkit.engine.checkpoint import metadata

    assert metadata(composed.state_dict())["method"] == metadata(opt.state_dict())["method"]
