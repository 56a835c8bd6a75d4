"""Block plan and fallback policy: which parameters get Kronecker factors and which plain momentum."""

import pytest
import torch
from torch import nn

import curvkit
import curvkit_kfac


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.grouped = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4 + 4 * 4 * 4, 3)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, tokens, image):
        h = self.norm(self.embed(tokens)).mean(1)
        c = self.grouped(torch.relu(self.conv(image))).flatten(1)
        return self.scale * self.head(torch.cat([h, c], 1))


def _batch(n=5):
    return torch.randint(0, 10, (n, 3)), torch.randn(n, 1, 4, 4)


def test_block_plan_shows_kfac_and_fallback_blocks():
    model = Mixed()
    opt = curvkit_kfac.KFAC(model)
    kinds = {b.name: b.kind for b in opt.blocks}
    assert kinds == {
        "embed": "kronecker",
        "conv": "kronecker",
        "grouped.weight": curvkit_kfac.FALLBACK_KIND,
        "grouped.bias": curvkit_kfac.FALLBACK_KIND,
        "norm.weight": curvkit_kfac.FALLBACK_KIND,
        "norm.bias": curvkit_kfac.FALLBACK_KIND,
        "head": "kronecker",
        "scale": curvkit_kfac.FALLBACK_KIND,
    }
    by_name = {b.name: b for b in opt.blocks}
    assert by_name["conv"].shape == (2, 1 * 9 + 1) and by_name["head"].shape == (3, 68 + 1)
    assert all(not any(b.factored) for b in opt.blocks if b.kind != "kronecker")
    text = str(opt.block_plan())
    assert "groups=2" in text and "LayerNorm is not a Linear, Conv2d or Embedding layer" in text
    assert "homogeneous bias" in text and text.count("fallback: momentum") == 5
    # training runs, fallback blocks never get factors
    for _ in range(3):
        out = model(*_batch())
        opt.zero_grad()
        opt.update_curvature(out, loss="cross_entropy")
        out.logsumexp(1).sum().backward()
        opt.step()
    for b in opt.blocks:
        factors = opt.estimator.factors(b, opt.block_state(b)["estimator"], damping=0.3)
        assert (factors is None) == (b.kind != "kronecker")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_error_policy_names_the_parameter_and_the_fix():
    with pytest.raises(ValueError, match=r"'norm.weight'.*fallback='momentum'"):
        curvkit_kfac.KFAC(Mixed(), fallback="error")
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"groups=2"):
        curvkit_kfac.KFAC(model, fallback="error")
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2))
    assert all(b.kind == "kronecker" for b in curvkit_kfac.KFAC(plain, fallback="error").blocks)


def test_bias_outside_the_optimizer_or_in_another_group():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = curvkit_kfac.KFAC([model[0].weight, model[1].weight, model[1].bias], model=model)
    assert [(b.name, b.shape, b.kind) for b in opt.blocks] == [("0", (4, 3), "kronecker"), ("1", (2, 5), "kronecker")]
    groups = [{"params": [model[0].weight, model[1].weight, model[1].bias]}, {"params": [model[0].bias], "lr": 0.1}]
    opt = curvkit_kfac.KFAC(groups, model=model)
    # the usual "no weight decay on biases" split keeps the layer block; its schedule is the weight's
    plan = {b.name: (b.kind, b.group, b.shape) for b in opt.blocks}
    assert plan == {"0": ("kronecker", 0, (4, 4)), "1": ("kronecker", 0, (2, 5))}
    assert "bias from param group 1" in str(opt.block_plan())


def test_tied_weights_get_one_block_fed_by_every_use():
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    model = nn.Sequential(first, nn.Tanh(), second)
    opt = curvkit_kfac.KFAC(model)
    kinds = {b.name: b.kind for b in opt.blocks}
    assert kinds == {"0.weight": "kronecker", "0.bias": curvkit_kfac.FALLBACK_KIND, "2.bias": curvkit_kfac.FALLBACK_KIND}
    (tied,) = [b for b in opt.blocks if b.kind == "kronecker"]
    assert curvkit_kfac.planning.layer_modules(tied) == (first, second)
    assert "tied: statistics from 2 layers" in str(opt.block_plan())


def test_kfac_needs_the_model():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="model="):
        curvkit.compose(model.parameters(), estimator="kfac")
    with pytest.raises(ValueError, match="model="):
        curvkit_kfac.KFAC(model.parameters())
