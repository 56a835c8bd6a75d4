"""Muon and the AdamW routing against torch.optim.Muon / torch.optim.AdamW and a float64
Newton-Schulz written out from Jordan et al. (2024)."""

import pytest
import torch
from torch import nn

import curvkit
from curvkit.preconditioners.muon import lr_ratio, newton_schulz
from curvkit.testing import check_part, check_preconditioner, make_block


def _twin(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


def _run_pair(ours, theirs, params_a, params_b, steps, gen):
    """Same gradients into both; per-step parameter updates compared."""
    worst = 0.0
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=gen) for p in params_a]
        before = [p.detach().clone() for p in params_a]
        for p, q, g in zip(params_a, params_b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        for p, q, w0 in zip(params_a, params_b, before):
            da, db = (p - w0).detach(), (q - w0).detach()
            worst = max(worst, float((da - db).norm() / db.norm()))
    return worst


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"nesterov": False},
        {"adjust_lr_fn": "match_rms_adamw", "weight_decay": 0.0},
        {"momentum": 0.9, "ns_steps": 3, "eps": 1e-5, "weight_decay": 0.3},
    ],
)
def test_muon_equals_torch_muon_on_matrices(options):
    gen = torch.Generator().manual_seed(1)
    shapes = [(8, 5), (5, 8), (8, 5), (6, 6)]  # tall, wide, a same-shape pair, square
    a = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    b = _twin(a)
    ours = curvkit.Muon(a, lr=0.02, route_unmodelled=None, **options)
    theirs = torch.optim.Muon(b, lr=0.02, **options)
    # identical bf16 iterations: agreement up to the float32 rounding of the Nesterov mix
    assert _run_pair(ours, theirs, a, b, 6, gen) < 2e-2


def test_muon_flattens_conv_weights_like_torch_muon_on_the_matrix():
    gen = torch.Generator().manual_seed(2)
    conv = nn.Parameter(torch.randn(6, 3, 3, 3, generator=gen))
    flat = nn.Parameter(conv.detach().reshape(6, 27).clone())
    ours = curvkit.Muon([conv], lr=0.05, route_unmodelled=None)
    theirs = torch.optim.Muon([flat], lr=0.05)
    for _ in range(4):
        g = torch.randn(6, 3, 3, 3, generator=gen)
        conv.grad, flat.grad = g.clone(), g.reshape(6, 27).clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(conv.detach().reshape(6, 27), flat.detach(), rtol=1e-3, atol=1e-4)


def reference_newton_schulz(x, a, b, c, steps, eps):
    """One matrix at a time, float64, as written in the Muon post."""
    x = x.to(torch.float64)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / max(float(torch.linalg.matrix_norm(x)), eps)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if tall else x


def test_newton_schulz_float64_matches_the_written_out_iteration_and_orthogonalises():
    gen = torch.Generator().manual_seed(3)
    batch = torch.randn(3, 7, 4, generator=gen, dtype=torch.float64)
    out = newton_schulz(batch, dtype=torch.float64)
    for x, o in zip(batch, out):
        torch.testing.assert_close(o, reference_newton_schulz(x, 3.4445, -4.7750, 2.0315, 5, 1e-7), rtol=1e-12, atol=1e-12)
        # the quintic drives singular values into roughly (0.5, 1.5) (the Muon post)
        s = torch.linalg.svdvals(o)
        assert float(s.min()) > 0.5 and float(s.max()) < 1.5
    # the classical cubic iteration (1.5, -0.5, 0) converges to U V^T with enough steps
    exact = newton_schulz(batch, coefficients=(1.5, -0.5, 0.0), steps=60, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(batch, full_matrices=False)
    torch.testing.assert_close(exact, u @ vh, rtol=1e-8, atol=1e-8)


def test_apply_group_equals_one_block_at_a_time():
    pre = curvkit.MuonPreconditioner(iteration_dtype="float64", adjust_lr="match_rms_adamw")
    gen = torch.Generator().manual_seed(4)
    blocks = [make_block((5, 3, 2)) for _ in range(3)]
    dirs = [torch.randn(5, 3, 2, generator=gen, dtype=torch.float64) for _ in blocks]
    grads = [torch.randn(5, 3, 2, generator=gen, dtype=torch.float64) for _ in blocks]
    together = pre.apply_group(blocks, [{}] * 3, dirs, [None] * 3, gradients=grads)
    for b, d, g, t in zip(blocks, dirs, grads, together):
        alone = pre.apply(b, {}, d, None, gradient=g)
        torch.testing.assert_close(t, alone, rtol=1e-12, atol=1e-12)
        target = (0.05 * g + 0.95 * d).reshape(5, 6)
        expected = reference_newton_schulz(target, 3.4445, -4.7750, 2.0315, 5, 1e-7) * 0.2 * 6**0.5
        torch.testing.assert_close(t.reshape(5, 6), expected, rtol=1e-12, atol=1e-12)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.hidden = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, idx):
        return self.head(self.norm(torch.tanh(self.hidden(self.embed(idx)))))


def test_muon_routes_unmodelled_blocks_to_adamw_like_torch():
    torch.manual_seed(0)
    net, twin = Net(), Net()
    twin.load_state_dict(net.state_dict())
    opt = curvkit.Muon(net.parameters(), model=net, lr=0.02, adamw_lr=3e-3, unmodelled=("head.*",))
    muon_names = {"hidden.weight"}
    tm = torch.optim.Muon([p for n, p in twin.named_parameters() if n in muon_names], lr=0.02)
    ta = torch.optim.AdamW([p for n, p in twin.named_parameters() if n not in muon_names], lr=3e-3, weight_decay=0.1)
    plan = {b.name: opt.preconditioner.describe(b) for b in opt.blocks}
    assert plan["hidden.weight"].startswith("modelled: Muon")
    for name in ("embed.weight", "hidden.bias", "norm.weight", "head.weight", "head.bias"):
        assert plan[name] == "unmodelled: AdamW (no curvature model)", (name, plan[name])
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        idx = torch.randint(0, 10, (16,), generator=gen)
        y = torch.randint(0, 4, (16,), generator=gen)
        for model, opts in ((net, [opt]), (twin, [tm, ta])):
            for o in opts:
                o.zero_grad()
            nn.functional.cross_entropy(model(idx), y).backward()
            for o in opts:
                o.step()
    for (n, p), (_, q) in zip(net.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def test_muon_parts_conform_and_preset_resumes():
    check_part("preconditioner", "muon")
    check_part("preconditioner", "adamw")
    check_part("preconditioner", "partition")
    check_part("estimator", "none")
    check_preconditioner(curvkit.MuonPreconditioner(iteration_dtype="float32"), dtype=torch.float32)
    check_part("method", "Muon", options={"lr": 0.02})
    check_part("method", "Muon", options={"lr": 0.02, "route_unmodelled": None})


def test_adamw_part_is_torch_adamw():
    gen = torch.Generator().manual_seed(6)
    a = [nn.Parameter(torch.randn(4, 3, generator=gen)), nn.Parameter(torch.randn(5, generator=gen))]
    b = _twin(a)
    ours = curvkit.compose(a, estimator="none", inverter="identity", preconditioner="adamw",
                           preconditioner_options={"beta1": 0.8, "beta2": 0.99, "eps": 1e-6},
                           lr=1e-2, weight_decay=0.05, momentum=0.0)
    theirs = torch.optim.AdamW(b, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    assert _run_pair(ours, theirs, a, b, 5, gen) < 1e-5


def test_lr_ratio_rules():
    assert lr_ratio("original", 8, 2) == 2.0 and lr_ratio("original", 2, 8) == 1.0
    assert lr_ratio("match_rms_adamw", 4, 25) == pytest.approx(1.0)
    assert lr_ratio("none", 3, 9) == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ns_steps": 0}, "ns_steps"),
        ({"ns_steps": 100}, "ns_steps"),
        ({"adjust_lr": "rms"}, "adjust_lr"),
        ({"coefficients": (1.0, 2.0)}, "coefficients"),
        ({"iteration_dtype": "float16"}, "iteration_dtype"),
        ({"momentum": 1.0}, "momentum"),
    ],
)
def test_muon_preconditioner_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        curvkit.MuonPreconditioner(**kwargs)


def test_partition_and_routing_reject_bad_options():
    with pytest.raises(ValueError, match="label"):
        curvkit.Partition(label="rows")
    with pytest.raises(ValueError, match="unmodelled"):
        curvkit.Partition(preconditioners={"modelled": "muon"})
    with pytest.raises(ValueError, match="nest"):
        curvkit.Partition(preconditioners={"modelled": "partition", "unmodelled": "adamw"})
    with pytest.raises(ValueError, match="route_unmodelled"):
        curvkit.Muon([nn.Parameter(torch.zeros(2, 2))], route_unmodelled="sgd")
    with pytest.raises(ValueError, match="needs route_unmodelled"):
        curvkit.Muon([nn.Parameter(torch.zeros(2, 2))], route_unmodelled=None, unmodelled=("x",))
    with pytest.raises(ValueError, match="scale"):
        curvkit.AdamW(scale=0.0)


def test_partition_with_a_callable_label_and_compose_checks_accepts():
    pre = curvkit.Partition(label=lambda b: "modelled" if b.numel > 10 else "unmodelled",
                            preconditioners={"modelled": "adam_eigenbasis", "unmodelled": "adamw"})
    assert pre.accepts == ("matrix", "eigenbasis")
    assert isinstance(pre.config.to_dict()["label"], str)
    big, small = make_block((4, 3)), make_block((3,))
    assert pre.describe(big).startswith("modelled: Adam in the eigenbasis")
    assert pre.describe(small).startswith("unmodelled: AdamW")
