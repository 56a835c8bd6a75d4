"""torch.optim conventions and misuse errors of the composed optimizer."""

import io

import pytest
import torch
from torch import nn

import curvkit


def mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def train(model, opt, steps, *, x=None, y=None, sched=None):
    x = torch.randn(16, 6) if x is None else x
    y = torch.randint(0, 3, (16,)) if y is None else y
    losses = []
    for _ in range(steps):
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        opt.update_curvature(out, loss="cross_entropy")
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def test_trains_and_reduces_loss():
    model = mlp()
    opt = curvkit.TNT(model.parameters(), lr=0.01)
    losses = train(model, opt, 30)
    assert losses[-1] < 0.5 * losses[0]


def test_exact_resume_through_torch_save_weights_only():
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    a = mlp()
    b = mlp()
    b.load_state_dict(a.state_dict())
    opt_a = curvkit.TNT(a.parameters(), lr=0.01, curvature_every=2, invert_every=3)
    train(a, opt_a, 7, x=x, y=y)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    train(a, opt_a, 6, x=x, y=y)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    c = mlp()
    c.load_state_dict(ckpt["model"])
    opt_c = curvkit.TNT(c.parameters(), lr=0.01, curvature_every=2, invert_every=3)
    opt_c.load_state_dict(ckpt["opt"])
    assert opt_c.step_count == 7
    train(c, opt_c, 6, x=x, y=y)
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)


def test_load_state_dict_rejects_other_layout_and_method():
    a = mlp()
    opt = curvkit.TNT(a.parameters())
    train(a, opt, 1)
    sd = opt.state_dict()
    other = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="block layout"):
        curvkit.TNT(other.parameters()).load_state_dict(sd)
    cholesky = curvkit.compose(mlp().parameters(), estimator="tensor_normal", inverter="cholesky")
    with pytest.raises(ValueError, match="inverter 'damped_eigen'"):
        cholesky.load_state_dict(sd)
    with pytest.raises(ValueError, match="not a curvkit"):
        curvkit.TNT(mlp().parameters()).load_state_dict(torch.optim.SGD(a.parameters(), lr=1).state_dict())


def test_param_groups_have_their_own_options():
    model = mlp()
    groups = [
        {"params": model[0].parameters(), "lr": 0.0},
        {"params": model[2].parameters(), "damping": 1.0, "weight_decay": 0.1},
    ]
    opt = curvkit.TNT(groups, lr=0.01)
    before = [p.detach().clone() for p in model[0].parameters()]
    train(model, opt, 3)
    for b, p in zip(before, model[0].parameters()):
        assert torch.equal(b, p)  # lr 0 group untouched
    assert opt.param_groups[1]["damping"] == 1.0 and opt.param_groups[0]["damping"] == 0.1


def test_lr_scheduler_changes_the_step():
    model = mlp()
    opt = curvkit.TNT(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    train(model, opt, 4, sched=sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_closure_is_called_and_its_loss_returned():
    model = mlp()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    opt = curvkit.TNT(model.parameters(), lr=0.01, evidence="empirical")
    calls = []

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        calls.append(1)
        return loss

    loss = opt.step(closure)
    assert calls == [1] and torch.is_tensor(loss)


def test_backward_first_gives_clear_error():
    model = mlp()
    opt = curvkit.TNT(model.parameters())
    out = model(torch.randn(4, 6))
    out.sum().backward()
    with pytest.raises(RuntimeError, match="before loss.backward"):
        opt.update_curvature(out, loss="cross_entropy")


def test_no_graph_and_missing_statistics_errors():
    model = mlp()
    opt = curvkit.TNT(model.parameters())
    with torch.no_grad():
        out = model(torch.randn(4, 6))
    with pytest.raises(RuntimeError, match="autograd graph"):
        opt.update_curvature(out, loss="cross_entropy")
    model(torch.randn(4, 6)).sum().backward()
    with pytest.raises(RuntimeError, match="update_curvature"):
        opt.step()


def test_update_curvature_is_a_no_op_when_not_due():
    model = mlp()
    opt = curvkit.TNT(model.parameters(), curvature_every=3)
    train(model, opt, 1)
    out = model(torch.randn(4, 6))
    assert opt.update_curvature(out, loss="cross_entropy") is False
    # nothing retained: a single backward frees the graph as usual
    out.sum().backward()


@pytest.mark.parametrize(
    "kwargs,name",
    [({"lr": -1.0}, "lr"), ({"momentum": 1.0}, "momentum"), ({"damping": 0.0}, "damping"),
     ({"curvature_every": 0}, "curvature_every"), ({"invert_every": 2.5}, "invert_every"),
     ({"weight_decay": -1}, "weight_decay"), ({"max_factor_dim": 0}, "max_factor_dim"),
     ({"nonfinite": "ignore"}, "nonfinite"), ({"stat_decay": 2.0}, "stat_decay"),
     ({"evidence": "fisher"}, "evidence")],
)
def test_invalid_options_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        curvkit.TNT(mlp().parameters(), **kwargs)


def test_invalid_group_option_is_named():
    model = mlp()
    with pytest.raises(ValueError, match="damping"):
        curvkit.TNT([{"params": model.parameters(), "damping": -1}])


def test_bad_parameter_lists_rejected():
    with pytest.raises(ValueError, match="empty"):
        curvkit.TNT([])
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="more than once"):
        curvkit.TNT([p, p])
    with pytest.raises(ValueError, match="complex"):
        curvkit.TNT([nn.Parameter(torch.randn(3, dtype=torch.complex64))])


def test_frozen_and_gradless_parameters_untouched():
    model = mlp()
    model[0].bias.requires_grad_(False)
    unused = nn.Parameter(torch.randn(5))
    opt = curvkit.TNT(list(model.parameters()) + [unused], lr=0.01)
    frozen, idle = model[0].bias.detach().clone(), unused.detach().clone()
    train(model, opt, 3)
    assert torch.equal(frozen, model[0].bias) and torch.equal(idle, unused)


def test_sparse_gradient_rejected():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = curvkit.TNT(emb.parameters(), evidence="empirical")
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_bfloat16_parameters_keep_float32_statistics():
    model = mlp().to(torch.bfloat16)
    opt = curvkit.TNT(model.parameters(), lr=0.01)
    x = torch.randn(16, 6, dtype=torch.bfloat16)
    train(model, opt, 3, x=x)
    st = opt.block_state(0)
    assert st["estimator"]["grams"][0].dtype == torch.float32
    assert st["momentum"].dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())


def test_block_plan_names_and_max_factor_dim():
    model = nn.Sequential(nn.Linear(6, 30), nn.ReLU(), nn.Conv1d(1, 2, 3))
    opt = curvkit.TNT(model.parameters(), model=model, max_factor_dim=20)
    text = str(opt.block_plan())
    assert "0.weight" in text and "30(id) x 6" in text and "2.weight" in text
    assert len(opt.block_plan()) == 4


def test_add_param_group_plans_new_parameters():
    a, b = nn.Linear(4, 3), nn.Linear(3, 2)
    opt = curvkit.TNT(a.parameters(), lr=0.01)
    opt.add_param_group({"params": b.parameters(), "lr": 0.1})
    assert len(opt.blocks) == 4 and opt.blocks[-1].group == 1
    out = b(a(torch.randn(8, 4)))
    opt.zero_grad()
    opt.update_curvature(out, loss="cross_entropy")
    out.sum().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in b.parameters())


def test_zero_grad_and_step_count():
    model = mlp()
    opt = curvkit.TNT(model.parameters())
    train(model, opt, 2)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert opt.step_count == 2


def test_sync_statistics_needs_a_process_group_and_linear_statistics():
    model = mlp()
    opt = curvkit.TNT(model.parameters(), sync_statistics=True)
    out = model(torch.randn(4, 6))
    with pytest.raises(RuntimeError, match="init_process_group"):
        opt.update_curvature(out, loss="cross_entropy")

    class NonLinear(curvkit.TensorNormal):
        linear_statistics = False

    with pytest.raises(ValueError, match="linear"):
        curvkit.CurvatureOptimizer(mlp().parameters(), estimator=NonLinear(), preconditioner=curvkit.KroneckerMode(),
                                   inverter=curvkit.DampedEigen(), sync_statistics=True)


def test_sync_statistics_in_a_single_process_group_is_the_identity():
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        a, b = mlp(), mlp()
        b.load_state_dict(a.state_dict())
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
        opt_a = curvkit.TNT(a.parameters(), lr=0.01, seed=1, sync_statistics=True)
        opt_b = curvkit.TNT(b.parameters(), lr=0.01, seed=1)
        train(a, opt_a, 3, x=x, y=y)
        train(b, opt_b, 3, x=x, y=y)
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    finally:
        dist.destroy_process_group()


def test_estimator_with_inverse_factors_requires_the_identity_inverter():
    class InverseFactors(curvkit.TensorNormal):
        factors_are_inverses = True

    with pytest.raises(ValueError, match="inverter='identity'"):
        curvkit.CurvatureOptimizer(mlp().parameters(), estimator=InverseFactors(), preconditioner=curvkit.KroneckerMode(),
                                   inverter=curvkit.DampedEigen())
    curvkit.CurvatureOptimizer(mlp().parameters(), estimator=InverseFactors(), preconditioner=curvkit.KroneckerMode(),
                               inverter=curvkit.IdentityInverter())
