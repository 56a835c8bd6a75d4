"""EKFAC (George et al., 2018) against a float64 reference written out with dense matrices.

The reference below uses nothing of the plugin: the forward pass is written by hand, per-example
gradients come from autograd on each example alone, the Fisher in the Kronecker-factored
eigenbasis is a dense ``torch.kron`` product, and the direction is a dense solve.
"""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvkit
import curvkit_kfac
from kfac_reference import deterministic_loss


def _view(layer, tensors):
    w = tensors[0].reshape(tensors[0].shape[0], -1)
    return torch.cat([w, tensors[1][:, None]], dim=1) if len(tensors) == 2 else w


def _mlp_pieces(model, x, targets):
    """Per layer: rows a_n (with the homogeneous 1), output gradients g_n = d l_n / d s_n, and the
    per-example gradient views (autograd on each example alone); l_n = sum(sin(out_n) * T_n)."""
    lin1, lin2 = model[0], model[2]
    w1, b1, w2, b2 = (p.detach().clone().requires_grad_(True) for p in (lin1.weight, lin1.bias, lin2.weight, lin2.bias))
    rows = {0: ([], [], []), 1: ([], [], [])}
    for n in range(x.shape[0]):
        xn = x[n]
        h = w1 @ xn + b1
        z = torch.tanh(h)
        out = w2 @ z + b2
        loss = (torch.sin(out) * targets[n]).sum()
        gh, gout, gw1, gb1, gw2, gb2 = torch.autograd.grad(loss, [h, out, w1, b1, w2, b2])
        one = torch.ones(1, dtype=x.dtype)
        for i, (a, g, grad) in enumerate(((xn, gh, _view(None, [gw1, gb1])), (z.detach(), gout, _view(None, [gw2, gb2])))):
            rows[i][0].append(torch.cat([a, one]))
            rows[i][1].append(g)
            rows[i][2].append(grad)
    return [tuple(torch.stack(v) for v in rows[i]) for i in (0, 1)]


class ReferenceEKFAC:
    """EKFAC as the module docstring of curvkit_kfac.ekfac states it, for one 2-layer MLP:
    A, G EMAs; s EMA of the per-example squared gradients in the current basis; at a refresh the
    new bases from eigh(G), eigh(A) and s re-expressed as the diagonal of the old eigen-corrected
    Fisher in the new basis; direction (K diag(s) K^T + lam I)^{-1} vec(M), K = U_G kron U_A."""

    def __init__(self, dims, *, beta, lam, mu, t2):
        self.beta, self.lam, self.mu, self.t2 = beta, lam, mu, t2
        self.A = [None, None]
        self.G = [None, None]
        self.s = [None, None]
        self.U = [(torch.eye(o, dtype=torch.float64), torch.eye(i, dtype=torch.float64)) for o, i in dims]
        self.M = [None, None]
        self.t = 0

    def step(self, pieces, grads):
        t = self.t
        refresh = t % self.t2 == 0 or t < self.t2
        directions = []
        for l, ((a, g, per_example), grad) in enumerate(zip(pieces, grads)):
            m = a.shape[0]
            a_hat = sum(torch.outer(a[n], a[n]) for n in range(m)) / m
            g_hat = sum(torch.outer(g[n], g[n]) for n in range(m)) / m
            ug, ua = self.U[l]
            s_hat = sum((ug.T @ per_example[n] @ ua) ** 2 for n in range(m)) / m
            if t == 0:
                self.A[l], self.G[l], self.s[l] = a_hat, g_hat, s_hat
            else:
                b = self.beta
                self.A[l] = b * self.A[l] + (1 - b) * a_hat
                self.G[l] = b * self.G[l] + (1 - b) * g_hat
                self.s[l] = b * self.s[l] + (1 - b) * s_hat
            if refresh:
                ug_new = torch.linalg.eigh(self.G[l])[1]
                ua_new = torch.linalg.eigh(self.A[l])[1]
                # diag of K diag(s) K^T in the new basis K': ((K'^T K) o (K'^T K)) vec(s)
                k_old, k_new = torch.kron(ug, ua), torch.kron(ug_new, ua_new)
                r = k_new.T @ k_old
                self.s[l] = ((r * r) @ self.s[l].reshape(-1)).reshape(self.s[l].shape)
                self.U[l] = (ug_new, ua_new)
            self.M[l] = grad.clone() if self.M[l] is None else self.mu * self.M[l] + grad
            k = torch.kron(*self.U[l])
            fisher = k @ torch.diag(self.s[l].reshape(-1)) @ k.T
            eye = torch.eye(fisher.shape[0], dtype=torch.float64)
            p = torch.linalg.solve(fisher + self.lam * eye, self.M[l].reshape(-1))
            directions.append(p.reshape(self.M[l].shape))
        self.t += 1
        return directions, refresh


def test_ekfac_direction_equals_the_dense_eigen_corrected_fisher_solve():
    gen = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64, generator=gen)
    lr, lam, beta = 0.1, 0.05, 0.8
    opt = curvkit_kfac.EKFAC(model, lr=lr, damping=lam, stat_decay=beta, invert_every=3)
    ref = ReferenceEKFAC([(4, 4), (2, 5)], beta=beta, lam=lam, mu=0.9, t2=3)
    layers = [model[0], model[2]]
    refreshes = []
    for t in range(7):  # refreshes at t = 0, 1, 2, 3, 6
        ts = torch.randn(5, 2, dtype=torch.float64, generator=gen)
        tb = torch.randn(5, 2, dtype=torch.float64, generator=gen)
        pieces = _mlp_pieces(model, x, ts)
        out = model(x)
        opt.zero_grad()
        opt.update_curvature(out, loss=deterministic_loss(ts))
        deterministic_loss(tb)(out).backward()
        grads = [_view(l, [p.grad.clone() for p in l.parameters()]) for l in layers]
        before = [[p.detach().clone() for p in l.parameters()] for l in layers]
        opt.step()
        expected, refresh = ref.step(pieces, grads)
        refreshes.append(refresh)
        for l, bs, e in zip(layers, before, expected):
            got = _view(l, [(b - p.detach()) / lr for b, p in zip(bs, l.parameters())])
            torch.testing.assert_close(got, e, rtol=1e-8, atol=1e-10)
    assert refreshes == [True, True, True, True, False, False, True]
    assert opt.block_state(0)["inverses"][0].version == 5


def test_ekfac_scalings_are_the_diagonal_of_the_per_example_fisher_in_the_eigenbasis():
    """The paper's optimality claim: s = diag(K^T F K), F the dense per-example Fisher, for a
    Linear layer (rows) and a Conv2d layer (per-example gradients summed over positions)."""
    gen = torch.Generator().manual_seed(7)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(12, 4)).double()
    x = torch.randn(6, 2, 4, 4, dtype=torch.float64, generator=gen)
    targets = torch.randn(6, 4, dtype=torch.float64, generator=gen)
    # lr = 0 and stat_decay = 0: the second step sees the same batch, so its basis (a refresh of
    # the same factors) is the one its scalings were estimated in
    opt = curvkit_kfac.EKFAC(model, lr=0.0, damping=0.1, stat_decay=0.0, invert_every=5)
    for _ in range(2):
        out = model(x)
        opt.zero_grad()
        opt.update_curvature(out, loss=deterministic_loss(targets))
        out.sum().backward()
        opt.step()
    layers = [model[0], model[3]]
    per_example = [[], []]
    for n in range(x.shape[0]):
        loss = (torch.sin(model(x[n : n + 1])) * targets[n]).sum()
        grads = torch.autograd.grad(loss, [p for l in layers for p in l.parameters()])
        per_example[0].append(_view(None, grads[0:2]).reshape(-1))
        per_example[1].append(_view(None, grads[2:4]).reshape(-1))
    for block, rows in zip(opt.blocks, per_example):
        state = opt.block_state(block)
        g = torch.stack(rows)
        fisher = g.T @ g / g.shape[0]
        ug, ua = (e.vectors for e in state["inverses"])
        k = torch.kron(ug, ua)
        s = state["estimator"]["scale"]
        torch.testing.assert_close(s.reshape(-1), torch.diagonal(k.T @ fisher @ k), rtol=1e-9, atol=1e-12)
        # and it is the best diagonal in that basis: any other diagonal fits F worse
        err = torch.linalg.norm(fisher - k @ torch.diag(s.reshape(-1)) @ k.T)
        worse = torch.linalg.norm(fisher - k @ torch.diag(1.01 * s.reshape(-1)) @ k.T)
        assert err < worse


def test_ekfac_without_weight_sharing_differs_from_kfac_and_matches_it_when_kronecker():
    """EKFAC's first-step scalings are not KFAC's eigenvalues (so the reference test can tell
    the two apart)."""
    model = nn.Sequential(nn.Linear(3, 4)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    targets = torch.randn(8, 4, dtype=torch.float64)
    opt = curvkit_kfac.EKFAC(model, lr=0.0, stat_decay=0.0)
    for _ in range(2):
        out = model(x)
        opt.zero_grad()
        opt.update_curvature(out, loss=deterministic_loss(targets))
        out.sum().backward()
        opt.step()
    st = opt.block_state(0)
    kfac_values = torch.outer(torch.linalg.eigvalsh(st["estimator"]["G"]), torch.linalg.eigvalsh(st["estimator"]["A"]))
    assert float((st["estimator"]["scale"] - kfac_values).abs().max()) > 1e-3


def test_registration_pairing_and_errors():
    assert curvkit.get("estimator", "ekfac") is curvkit_kfac.EKFACEstimator
    assert curvkit.get("preconditioner", "eigen_corrected") is curvkit_kfac.EigenCorrected
    assert curvkit.get("method", "EKFAC") is curvkit_kfac.EKFAC
    model = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="estimator='ekfac'"):
        curvkit.compose(model.parameters(), estimator="kfac", preconditioner="eigen_corrected",
                        inverter="eigenbasis", model=model)
    with pytest.raises(ValueError, match="accepts"):
        curvkit.compose(model.parameters(), estimator="ekfac", preconditioner="eigen_corrected",
                        inverter="damped_eigen", model=model)
    with pytest.raises(ValueError, match="pi_damping"):
        curvkit_kfac.EKFACEstimator(pi_damping=True)
    with pytest.raises(ValueError, match="scale_decay"):
        curvkit_kfac.EKFACEstimator(scale_decay=1.5)
    with pytest.raises(ValueError, match="EKFAC"):
        curvkit_kfac.EKFAC(model.parameters())
    pre = curvkit_kfac.EigenCorrected()
    block = curvkit_kfac.EKFAC(model).blocks[0]
    with pytest.raises(ValueError, match="statistics"):
        pre.apply(block, {}, torch.zeros(4, 4), None, gradient=torch.zeros(4, 4))


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1),
                         nn.GroupNorm(2, 6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 10))


def _steps(model, opt, batches):
    for x, y in batches:
        out = model(x)
        opt.zero_grad()
        opt.update_curvature(out, loss="cross_entropy")
        F.cross_entropy(out, y).backward()
        opt.step()


def test_state_dict_resume_is_bit_for_bit():
    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(6)]
    model = _cnn()
    opt = curvkit_kfac.EKFAC(model, lr=0.05, invert_every=2)
    _steps(model, opt, batches[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _steps(model, opt, batches[3:])
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh = _cnn()
    fresh.load_state_dict(saved["model"])
    opt2 = curvkit_kfac.EKFAC(fresh, lr=0.05, invert_every=2)
    opt2.load_state_dict(saved["opt"])
    _steps(fresh, opt2, batches[3:])
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name


def test_ekfac_trains_the_digits_autoencoder():
    sklearn = pytest.importorskip("sklearn.datasets")
    x = torch.tensor(sklearn.load_digits().data, dtype=torch.float32) / 16.0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.Linear(16, 32), nn.ReLU(),
                          nn.Linear(32, 64))
    opt = curvkit_kfac.EKFAC(model, lr=1e-2)

    def full_loss():
        with torch.no_grad():
            return float(F.binary_cross_entropy_with_logits(model(x), x, reduction="sum") / len(x))

    start = full_loss()
    for _ in range(2):
        for idx in torch.randperm(len(x)).split(100):
            out = model(x[idx])
            opt.zero_grad()
            opt.update_curvature(out, loss="bce_with_logits")
            (F.binary_cross_entropy_with_logits(out, x[idx], reduction="sum") / len(idx)).backward()
            opt.step()
    end = full_loss()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert end < 0.8 * start, (start, end)


def test_no_host_reads_in_steady_state_steps():
    from curvkit.testing import count_host_reads

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4), nn.Tanh(),
                          nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))  # two (4, 5) blocks: the batched path
    opt = curvkit_kfac.EKFAC(model, invert_every=4)
    data = [(torch.randn(6, 1, 6, 6), torch.randint(0, 4, (6,))) for _ in range(8)]
    _steps(model, opt, data[:5])
    est, pre = opt.estimator, opt.preconditioner
    owners = [(est, "update"), (est, "batch_statistics"), (est, "fold"), (pre, "apply_group")]
    with count_host_reads(owners) as counter:
        _steps(model, opt, data[5:])  # steps 5, 6, 7: no inversion due
    assert counter.count == 0, counter.where
    assert opt.block_state(0)["estimator"]["scale_updates"] == 8


def test_ekfac_embedding_scalings_are_the_diagonal_of_the_per_example_fisher():
    """nn.Embedding: the one-hot input rotated by indexing U_A (vocabulary mode first)."""
    gen = torch.Generator().manual_seed(9)
    model = nn.Sequential(nn.Embedding(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    ids = torch.tensor([0, 2, 2, 5, 1, 2, 0, 3])
    targets = torch.randn(8, 3, dtype=torch.float64, generator=gen)
    opt = curvkit_kfac.EKFAC(model, lr=0.0, damping=0.1, stat_decay=0.0, invert_every=5)
    for _ in range(2):
        out = model(ids)
        opt.zero_grad()
        opt.update_curvature(out, loss=deterministic_loss(targets))
        out.sum().backward()
        opt.step()
    rows = []
    for n in range(len(ids)):
        loss = (torch.sin(model(ids[n : n + 1])) * targets[n]).sum()
        (grad,) = torch.autograd.grad(loss, [model[0].weight])
        rows.append(grad.reshape(-1))
    g = torch.stack(rows)
    fisher = g.T @ g / g.shape[0]
    state = opt.block_state(0)
    assert tuple(state["estimator"]["scale"].shape) == (6, 4)
    ua, ug = (e.vectors for e in state["inverses"])
    k = torch.kron(ua, ug)
    torch.testing.assert_close(state["estimator"]["scale"].reshape(-1), torch.diagonal(k.T @ fisher @ k),
                               rtol=1e-9, atol=1e-12)


def test_conv_scalings_in_chunks_of_examples_equal_all_at_once(monkeypatch):
    from curvkit_kfac import ekfac

    results = []
    for limit in (2**24, 3 * 19):  # 3 * 19: two examples per chunk for the (3, 19) view below
        monkeypatch.setattr(ekfac, "PER_EXAMPLE_ELEMENTS", limit)
        torch.manual_seed(3)
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 16, 2)).double()
        opt = curvkit_kfac.EKFAC(model, lr=0.1)
        x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
        for _ in range(2):
            out = model(x)
            opt.zero_grad()
            opt.update_curvature(out, loss=deterministic_loss(torch.ones_like(out)))
            out.sum().backward()
            opt.step()
        results.append(opt.block_state(0)["estimator"]["scale"].clone())
    assert results[0].shape == (3, 19)
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-14)


def test_batched_directions_equal_block_by_block():
    class OneByOne(curvkit_kfac.EigenCorrected):
        def apply_group(self, blocks, states, directions, inverses, *, gradients, statistics=None):
            return [self.apply(b, s, d, inv, gradient=g, statistics=st)
                    for b, s, d, inv, g, st in zip(blocks, states, directions, inverses, gradients, statistics)]

    params = []
    for pre in (curvkit_kfac.EigenCorrected(), OneByOne()):
        torch.manual_seed(4)
        model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4, bias=False)).double()
        opt = curvkit.compose(model.parameters(), estimator="ekfac", preconditioner=pre, inverter="eigenbasis",
                              model=model, lr=0.1, damping=0.1, invert_every=2)
        gen = torch.Generator().manual_seed(5)
        for _ in range(4):
            x = torch.randn(6, 4, dtype=torch.float64, generator=gen)
            out = model(x)
            opt.zero_grad()
            opt.update_curvature(out, loss=deterministic_loss(torch.randn(6, 4, dtype=torch.float64, generator=gen)))
            out.square().sum().backward()
            opt.step()
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
