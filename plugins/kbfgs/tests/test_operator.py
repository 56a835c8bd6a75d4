"""K-BFGS(L)'s H_g operator against the dense L-BFGS matrix (float64), and K-BFGS(L) steps against
the old path that materialised it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvkit import Factor
from curvkit.contractions import mode_products
from curvkit_kbfgs import KBFGSL, KBFGSEstimator
from curvkit_kbfgs.bfgs import bfgs_inverse_update, lbfgs_apply, lbfgs_push
from curvkit_kbfgs.operator import LBFGSOperator

D = torch.float64


def _pairs(k, d, gen):
    s = torch.randn(k, d, dtype=D, generator=gen)
    y = s + 0.3 * torch.randn(k, d, dtype=D, generator=gen)  # s^T y > 0 with high probability
    y = torch.where(((s * y).sum(1) > 0)[:, None], y, -y)
    return s, y


def _dense_bfgs(s, y):
    """BFGS from H_0 = I with the pairs in order, written out as the product form."""
    d = s.shape[1]
    h = torch.eye(d, dtype=D)
    for si, yi in zip(s, y):
        rho = 1.0 / (si @ yi)
        left = torch.eye(d, dtype=D) - rho * torch.outer(si, yi)
        h = left @ h @ left.T + rho * torch.outer(si, si)
    return h


@pytest.mark.parametrize("k", [0, 1, 4, 9])
def test_operator_equals_the_dense_lbfgs_matrix(k):
    gen = torch.Generator().manual_seed(k)
    s, y = _pairs(k, 7, gen)
    op = LBFGSOperator(s, y)
    dense = _dense_bfgs(s, y)
    torch.testing.assert_close(op.to_dense(D), dense, rtol=1e-10, atol=1e-10)
    v = torch.randn(7, 5, dtype=D, generator=gen)
    torch.testing.assert_close(op.matmul(v), dense @ v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(op.matmul(v[:, 0]), dense @ v[:, 0], rtol=1e-10, atol=1e-10)
    if k:
        torch.testing.assert_close(op.matmul(v), lbfgs_apply(s, y, v), rtol=1e-10, atol=1e-10)  # two-loop
    # as a mode of a 3-tensor, through the core's mode products
    t = torch.randn(3, 7, 4, dtype=D, generator=gen)
    torch.testing.assert_close(mode_products(t, [None, op, None]), torch.einsum("ij,ajb->aib", dense, t))


def test_invalid_rows_of_the_memory_are_ignored():
    gen = torch.Generator().manual_seed(1)
    s, y = _pairs(6, 5, gen)
    valid = torch.tensor([False, False, True, True, False, True])
    junk_s, junk_y = s.clone(), y.clone()
    junk_s[~valid] = float("nan")  # stale rows after a restart may hold anything
    junk_y[~valid] = 1e30
    op = LBFGSOperator(junk_s, junk_y, valid)
    torch.testing.assert_close(op.to_dense(D), _dense_bfgs(s[valid], y[valid]), rtol=1e-10, atol=1e-10)


def test_push_keeps_the_last_pairs_in_order_without_host_reads():
    gen = torch.Generator().manual_seed(2)
    s, y = _pairs(5, 4, gen)
    S, Y, valid = torch.zeros(3, 4, dtype=D), torch.zeros(3, 4, dtype=D), torch.zeros(3, dtype=torch.bool)
    accept = [True, False, True, True, True]
    for i, a in enumerate(accept):
        S, Y, valid = lbfgs_push(S, Y, valid, s[i], y[i], torch.tensor(a))
    kept = [i for i, a in enumerate(accept) if a][-3:]
    assert valid.tolist() == [True, True, True]
    torch.testing.assert_close(S, s[kept])
    torch.testing.assert_close(LBFGSOperator(S, Y, valid).to_dense(D), _dense_bfgs(s[kept], y[kept]))
    h = torch.eye(4, dtype=D)
    for i in kept:
        h = bfgs_inverse_update(h, s[i], y[i])
    torch.testing.assert_close(LBFGSOperator(S, Y, valid).to_dense(D), h, rtol=1e-10, atol=1e-10)


class _OldDensePath(KBFGSEstimator):
    """The previous K-BFGS(L): H_g materialised as a dense matrix from the valid pairs."""

    name = "kbfgs"

    def factors(self, block, state, *, damping):
        out = super().factors(block, state, damping=damping)
        if out is None or out[0] is None:
            return out
        valid = state["valid"]
        dense = _dense_bfgs(state["S"][valid], state["Y"][valid]).to(state["S"].dtype)
        return [Factor(dense, 0.0), out[1]]


def test_kbfgs_l_steps_unchanged_against_the_dense_path():
    def model_and_opt(old):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3)).to(D)
        opt = KBFGSL(model, lr=0.1, memory=3)
        if old:
            opt.estimator = _OldDensePath(config=opt.estimator.config)
        return model, opt

    runs = [model_and_opt(False), model_and_opt(True)]
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(10, 6, dtype=D, generator=gen), torch.randint(0, 3, (10,), generator=gen)) for _ in range(8)]
    for model, opt in runs:
        for x, t in batches:
            def closure(model=model, opt=opt, x=x, t=t):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), t)
                loss.backward()
                return loss
            opt.step(closure)
    for p, q in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    st = runs[0][1].block_state(0)["estimator"]
    assert bool(st["valid"].all()) and int(st["counts"]["g_pairs"]) > 3  # the memory wrapped around


def test_rows_zeroed_memory_and_a_saved_operator_apply_the_same_matrix(tmp_path):
    """The estimator's memory keeps free rows at zero, so its operator skips the masking; an
    operator saved to disk keeps W and M only (C W is rebuilt on first use), and one pickled
    before C W was kept (no such attribute) still applies."""
    gen = torch.Generator().manual_seed(4)
    s, y = _pairs(5, 6, gen)
    valid = torch.tensor([False, False, True, True, True])
    s[~valid], y[~valid] = 0.0, 0.0
    dense = _dense_bfgs(s[valid], y[valid])
    fast = LBFGSOperator(s, y, valid, rows_zeroed=True)
    torch.testing.assert_close(fast.to_dense(D), dense, rtol=1e-10, atol=1e-10)
    torch.save({"op": fast}, tmp_path / "op.pt")
    loaded = torch.load(tmp_path / "op.pt", weights_only=True)["op"]
    assert loaded._q is None
    v = torch.randn(6, 4, dtype=D, generator=gen)
    torch.testing.assert_close(loaded.matmul(v), dense @ v, rtol=1e-10, atol=1e-10)
    older = object.__new__(LBFGSOperator)
    older.__dict__.update({k: w for k, w in fast.__dict__.items() if k != "_q"})
    torch.testing.assert_close(older.matmul(v[:, 0]), dense @ v[:, 0], rtol=1e-10, atol=1e-10)
