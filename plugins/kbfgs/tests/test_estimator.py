"""Block plan, fallback policy, K-BFGS(L) vs K-BFGS, warm start, loops, options, entry point."""

from __future__ import annotations

import io
import math
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import curvkit
import curvkit_kbfgs
from curvkit.testing import check_estimator, check_method
from curvkit_kbfgs import FALLBACK_KIND, KBFGS, KBFGSL, KBFGSConfig, KBFGSEstimator
from curvkit_kbfgs.bfgs import lbfgs_matrix

D = torch.float64


def conv_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 5), nn.LayerNorm(5), nn.Tanh(),
                         nn.Linear(5, 3))


def run(model, opt, steps, *, seed=0, shape=(6, 1, 4, 4), classes=3, closure_only=False):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(*shape, generator=gen, dtype=next(model.parameters()).dtype)
        y = torch.randint(0, classes, (shape[0],), generator=gen)

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        if not closure_only:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
        opt.step(closure)


def test_plan_factors_linear_layers_and_falls_back_for_the_rest():
    model = conv_model()
    opt = KBFGS(model)
    rows = {r["block"]: r for r in opt.block_plan().rows()}
    assert rows["2"]["view"] == "5 x 9" and rows["2"]["kind"] == "kronecker"
    assert rows["5"]["view"] == "3 x 6"
    for name in ("0.weight", "0.bias", "3.weight", "3.bias"):
        assert rows[name]["kind"] == FALLBACK_KIND and "(id)" in rows[name]["view"]
    assert "Conv2d" in rows["0.weight"]["rule"] and "LayerNorm" in rows["3.bias"]["rule"]
    conv_w = model[0].weight.detach().clone()
    run(model, opt, 1)
    for b in opt.blocks:
        factors = opt.estimator.factors(b, opt.block_state(b)["estimator"], damping=0.3)
        assert (factors is None) == (b.kind == FALLBACK_KIND)
    # the convolution took the plain (dampened) momentum step: -lr (1 - 0.9) g
    torch.testing.assert_close(model[0].weight.detach(), conv_w - 0.3 * 0.1 * model[0].weight.grad)


def test_error_policy_refuses_unsupported_layers_by_name():
    with pytest.raises(ValueError, match=r"'0\.weight'.*Conv2d.*unsupported='fallback'"):
        KBFGS(conv_model(), unsupported="error")


def test_bias_in_other_group_shared_weights_and_max_factor_dim():
    lin, other = nn.Linear(3, 4), nn.Linear(4, 4)
    shared = nn.Linear(4, 4)
    shared.weight = other.weight
    model = nn.Sequential(lin, other, shared)
    opt = KBFGS([{"params": [lin.weight]}, {"params": [lin.bias]},
                 {"params": [other.weight, other.bias, shared.bias]}], model=model, max_factor_dim=4)
    rows = {r["block"]: r for r in opt.block_plan().rows()}
    # weight and bias stay one block across param groups; the block follows the weight's group
    assert rows["0"]["view"] == "4 x 4" and "bias from param group 1" in rows["0"]["rule"]
    assert rows["0"]["group"] == 0 and "0.bias" not in rows
    assert rows["1.weight"]["kind"] == FALLBACK_KIND and "shared" in rows["1.weight"]["rule"]
    opt = KBFGS([{"params": [lin.weight]}, {"params": [other.weight, other.bias, shared.bias]}], model=model,
                max_factor_dim=3)
    rows = {r["block"]: r for r in opt.block_plan().rows()}
    assert rows["0"]["view"] == "4(id) x 3" and "bias" not in rows["0"]["rule"].split(":")[1]
    x = torch.randn(5, 3)
    model(x).sum().backward()
    opt.step(lambda: model(x).sum())
    est = opt.block_state(opt.blocks[0])["estimator"]
    factors = opt.estimator.factors(opt.blocks[0], est, damping=0.3)
    assert factors[0] is None and factors[1].matrix.shape == (3, 3)


def test_lbfgs_equals_dense_bfgs_while_the_memory_holds_every_pair():
    runs = {}
    for name, make in (("dense", lambda m: KBFGS(m, lr=0.1)), ("L", lambda m: KBFGSL(m, lr=0.1, memory=8))):
        torch.manual_seed(0)
        model = conv_model().to(D)
        opt = make(model)
        run(model, opt, 7)
        runs[name] = (model, opt)
    for p, q in zip(runs["dense"][0].parameters(), runs["L"][0].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    for bd, bl in zip(runs["dense"][1].blocks, runs["L"][1].blocks):
        sd, sl = runs["dense"][1].block_state(bd)["estimator"], runs["L"][1].block_state(bl)["estimator"]
        if sd:
            assert int(sl["valid"].sum()) == int(sd["counts"]["g_pairs"]) == 7
            valid = sl["valid"]
            torch.testing.assert_close(lbfgs_matrix(sl["S"][valid], sl["Y"][valid]), sd["Hg"], rtol=1e-9, atol=1e-11)


def test_lbfgs_keeps_only_the_last_memory_pairs():
    torch.manual_seed(0)
    model = conv_model().to(D)
    opt = KBFGSL(model, lr=0.1, memory=3)
    run(model, opt, 6)
    block = opt.blocks[[b.kind for b in opt.blocks].index("kronecker")]
    st = opt.block_state(block)["estimator"]
    assert st["S"].shape == (3, 5) and bool(st["valid"].all()) and st["counts"]["g_pairs"] == 6
    factor = opt.estimator.factors(block, st, damping=0.3)[0].matrix
    torch.testing.assert_close(factor.to_dense(D), lbfgs_matrix(st["S"], st["Y"]))


def test_warm_start_sets_a_to_the_exact_mean_and_inverts_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).to(D)
    opt = KBFGS(model, damping=0.5)
    xs = [torch.randn(4, 3, dtype=D) for _ in range(3)]
    assert opt.warm_start(xs, lambda x: model(x).pow(2).sum()) == 3
    a = torch.cat([torch.cat(xs), torch.ones(12, 1, dtype=D)], 1)
    st = opt.block_state(0)["estimator"]
    torch.testing.assert_close(st["A"], a.T @ a / 12, rtol=1e-12, atol=1e-14)
    x = torch.randn(4, 3, dtype=D)
    model(x).pow(2).sum().backward()
    opt.step(lambda: model(x).pow(2).sum())
    assert st["updates"] == 3  # the first step takes no new statistics
    inverse = torch.linalg.inv(a.T @ a / 12 + math.sqrt(0.5) * torch.eye(4, dtype=D))
    # the first Hessian-action pair is exact already, so H_a is still the inverse
    torch.testing.assert_close(opt.block_state(0)["estimator"]["Ha"], inverse, rtol=1e-10, atol=1e-12)


def test_closure_only_loop_matches_the_manual_loop_bit_for_bit():
    models = []
    for closure_only in (False, True):
        torch.manual_seed(0)
        model = conv_model()
        run(model, KBFGS(model, lr=0.1), 4, closure_only=closure_only)
        models.append(model)
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)


@pytest.mark.parametrize("preset", [KBFGS, KBFGSL])
def test_state_dict_resume_is_bit_for_bit(preset):
    torch.manual_seed(0)
    model = conv_model()
    opt = preset(model, lr=0.1)
    run(model, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    run(model, opt, 3, seed=1)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    fresh = conv_model()
    fresh.load_state_dict(ckpt["model"])
    opt2 = preset(fresh, lr=0.1)
    opt2.load_state_dict(ckpt["opt"])
    run(fresh, opt2, 3, seed=1)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="memory"):  # dense H_g state into an L-BFGS optimizer
        (KBFGSL if preset is KBFGS else KBFGS)(conv_model()).load_state_dict(ckpt["opt"])


class _DenseLBFGS(KBFGSEstimator):
    """K-BFGS(L) with its H_g operator handed over densely: the core conformance suite checks
    factors as matrices (symmetry, PSD); the operator itself is checked against the dense L-BFGS
    matrix in test_operator.py."""

    name = "kbfgs"

    def factors(self, block, state, *, damping):
        out = super().factors(block, state, damping=damping)
        if out is None or out[0] is None:
            return out
        return [out[0]._replace(matrix=out[0].matrix.to_dense(state["S"].dtype, state["S"].device)), out[1]]


@pytest.mark.parametrize("options", [{}, {"memory": 5, "lm": "add"}])
def test_estimator_conformance(options):
    estimator = KBFGSEstimator(**options) if not options else _DenseLBFGS(**options)
    check_estimator(estimator, inverter="identity")


def test_preset_conformance():  # KBFGS_L's preset is covered by the core's every-method tests
    check_method(KBFGS, options={"lr": 0.05})


@pytest.mark.parametrize(
    "option,value",
    [("stat_decay", 1.0), ("pair_decay", -0.1), ("powell", 0.0), ("powell", 1.0), ("lm", "levenberg"),
     ("memory", 0), ("skip_tol", -1.0), ("unsupported", "ignore")],
)
def test_config_validation_names_the_option(option, value):
    with pytest.raises(ValueError, match=option):
        KBFGSConfig(**{option: value})


def test_presets_need_the_model_and_a_closure():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="model"):
        KBFGS(model.parameters())
    with pytest.raises(ValueError, match="different model"):
        KBFGSL(model, model=nn.Linear(2, 2))
    opt = KBFGS(model.parameters(), model=model)
    assert opt.needs_closure and opt.param_groups[0]["lr"] == 0.3 and opt.param_groups[0]["damping"] == 0.3
    model(torch.randn(3, 2)).sum().backward()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


def test_closure_on_another_batch_is_refused():
    model = nn.Sequential(nn.Linear(2, 2))
    opt = KBFGS(model)
    model(torch.randn(3, 2)).sum().backward()
    with pytest.raises(ValueError, match="same batch"):
        opt.step(lambda: model(torch.randn(5, 2)).sum().backward())


def test_compose_finds_kbfgs_by_name_through_the_entry_point():
    code = (
        "import sys, torch, curvkit\n"
        "assert 'curvkit_kbfgs' not in sys.modules\n"
        "m = torch.nn.Linear(3, 2)\n"
        "opt = curvkit.compose(m.parameters(), estimator='kbfgs', inverter='identity', model=m,\n"
        "                      estimator_options={'memory': 7})\n"
        "assert type(opt.estimator).__module__ == 'curvkit_kbfgs.estimator'\n"
        "assert curvkit.available('estimator')['estimator']['kbfgs'] == 'curvkit-kbfgs'\n"
        "assert {'KBFGS', 'KBFGS_L'} <= set(curvkit.available('method')['method'])\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("preset", [KBFGS, KBFGSL])
@pytest.mark.parametrize("key", ["A", "Ha", "Hg"])
def test_corrupted_statistics_heal_themselves(preset, key):
    torch.manual_seed(0)
    model = conv_model()
    opt = preset(model, lr=0.1)
    run(model, opt, 3)
    block = next(b for b in opt.blocks if b.kind == "kronecker")
    st = opt.block_state(block)["estimator"]
    target = st["S"] if key == "Hg" and preset is KBFGSL else st[key]
    target[-1, 0] = float("nan")  # the newest pair of the memory
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", curvkit.CurvkitWarning)  # the direction keeps its last good factors
        run(model, opt, 2, seed=1)
    st = opt.block_state(block)["estimator"]
    assert st["counts"]["resets"] == 1
    for value in st.values():
        if isinstance(value, torch.Tensor):
            assert bool(torch.isfinite(value).all()), key
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if key != "Hg":  # restarted: A from the next batch alone, H_a from (0 + sqrt(lambda) I)^-1
        assert bool((st["A"].diagonal() > 0).any()) and st["updates"] > 0
        assert bool((torch.linalg.eigvalsh(st["Ha"].double()) > 0).all())
