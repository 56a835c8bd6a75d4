"""The KL (flip-flop, maximum-likelihood) estimate of tensor_normal: one update against dense
Kronecker algebra, convergence to the tensor-normal MLE, KL_Shampoo against a float64 reference of
Lin et al. (2025), and TNT_KL as a preset."""

import pytest
import torch
from torch import nn

import curvkit
from curvkit.interfaces import BlockEvidence
from curvkit.testing import check_estimator, check_part, make_block

from .test_soap import fold_product, unfold


def kron_all(mats):
    out = mats[0]
    for m in mats[1:]:
        out = torch.kron(out, m)
    return out


def spd(d, gen, cond=10.0):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return (q * torch.linspace(1.0, cond, d, dtype=torch.float64)) @ q.T


def test_one_kl_update_equals_the_dense_formula():
    """S_i <- b S_i + (1-b) G_(i) (kron_{j!=i} (S_j + delta_j I)^-1) G_(i)^T / prod_{j!=i} d_j."""
    gen = torch.Generator().manual_seed(1)
    shape = (3, 2, 4)
    est = curvkit.TensorNormal(evidence="empirical", estimate="kl", stat_decay=0.7, kl_damping=0.01)
    block = make_block(shape)
    state = est.init_state(block)
    est.update(block, state, BlockEvidence([torch.randn(shape, generator=gen, dtype=torch.float64)]))
    old = [s.clone() for s in state["grams"]]
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    est.update(block, state, BlockEvidence([g]))
    expected = []
    for i in range(3):
        others = [j for j in range(3) if j != i]
        damped = [old[j] + 0.01 * torch.trace(old[j]) / shape[j] * torch.eye(shape[j], dtype=torch.float64) for j in others]
        inv = kron_all([torch.linalg.inv(m) for m in damped])
        gi = unfold(g, i)  # columns ordered by the remaining modes in order, matching kron order
        sample = gi @ inv @ gi.T / (24 // shape[i])
        expected.append(0.7 * old[i] + 0.3 * sample)
    means = [torch.trace(e) / e.shape[0] for e in expected]  # then rescaled to a common mean eigenvalue
    common = torch.prod(torch.stack(means)) ** (1 / 3)
    for i in range(3):
        torch.testing.assert_close(state["grams"][i], expected[i] * common / means[i], rtol=1e-10, atol=1e-12)


def mle_flip_flop(samples, iters=100):
    """The tensor-normal MLE of (d1, d2) samples by the dense flip-flop algorithm (float64)."""
    n, d1, d2 = samples.shape
    a, b = torch.eye(d1, dtype=torch.float64), torch.eye(d2, dtype=torch.float64)
    for _ in range(iters):
        a = torch.einsum("nij,jk,nlk->il", samples, torch.linalg.inv(b), samples) / (n * d2)
        b = torch.einsum("nji,jk,nkl->il", samples, torch.linalg.inv(a), samples) / (n * d1)
    return torch.kron(a, b)


def kl_projection(sigma, d1, d2, iters=200):
    """argmin over A (x) B of KL(N(0, sigma) || N(0, A (x) B)): the population MLE, by flip-flop on
    the dense covariance (A = sum_cd sigma[(a,c),(b,d)] B^-1[d,c] / d2, and symmetrically)."""
    s4 = sigma.reshape(d1, d2, d1, d2)
    a, b = torch.eye(d1, dtype=torch.float64), torch.eye(d2, dtype=torch.float64)
    for _ in range(iters):
        a = torch.einsum("acbd,dc->ab", s4, torch.linalg.inv(b)) / d2
        b = torch.einsum("cadb,dc->ab", s4, torch.linalg.inv(a)) / d1
    return torch.kron(a, b)


def _stream(sigma, n, gen, d1, d2):
    root = torch.linalg.cholesky(sigma)
    return (root @ torch.randn(d1 * d2, n, generator=gen, dtype=torch.float64)).T.reshape(n, d1, d2)


def _estimate(samples, estimate, beta=0.99):
    d1, d2 = samples.shape[1:]
    block = make_block((d1, d2))
    est = curvkit.TensorNormal(evidence="empirical", estimate=estimate, stat_decay=beta)
    state = est.init_state(block)
    for x in samples:
        est.update(block, state, BlockEvidence([x.clone()]))
    f = est.factors(block, state, damping=0.0)
    return torch.kron(f[0].matrix, f[1].matrix)


def rel(a, b):
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def test_kl_factors_approach_the_tensor_normal_mle_of_a_non_kronecker_covariance():
    """Gradients from N(0, U1 (x) U2 + low rank): the KL estimate tends to the population MLE
    (the KL projection, computed densely), TNT's Gram estimate to a different Kronecker product."""
    gen = torch.Generator().manual_seed(2)
    d1, d2 = 4, 3
    v = torch.randn(d1 * d2, 2, generator=gen, dtype=torch.float64)
    sigma = torch.kron(spd(d1, gen, 20.0), spd(d2, gen, 8.0)) + 3.0 * v @ v.T
    target = kl_projection(sigma, d1, d2)
    samples = _stream(sigma, 5000, gen, d1, d2)
    kl, gram = _estimate(samples, "kl", 0.998), _estimate(samples, "gram", 0.998)
    assert rel(kl, target) < 0.1
    assert rel(gram, target) > 1.8 * rel(kl, target)
    # about as close as the batch MLE of the last 1000 samples (the EMA's memory is ~500)
    assert rel(kl, target) < 1.5 * rel(mle_flip_flop(samples[-1000:], 50), target)


def test_kl_estimate_is_consistent_for_a_kronecker_covariance():
    gen = torch.Generator().manual_seed(3)
    d1, d2 = 4, 3
    truth = torch.kron(spd(d1, gen, 20.0), spd(d2, gen, 8.0))
    samples = _stream(truth, 3000, gen, d1, d2)
    assert rel(_estimate(samples, "kl", 0.998), truth) < 0.1
    assert rel(kl_projection(truth, d1, d2), truth) < 1e-10


def test_kl_balanced_factors_keep_the_kronecker_product():
    gen = torch.Generator().manual_seed(6)
    est = curvkit.TensorNormal(estimate="kl", evidence="empirical")
    block = make_block((3, 5))
    state = est.init_state(block)
    for _ in range(4):
        est.update(block, state, BlockEvidence([torch.randn(3, 5, generator=gen, dtype=torch.float64)]))
    f = est.factors(block, state, damping=0.1)
    torch.testing.assert_close(torch.kron(f[0].matrix, f[1].matrix), torch.kron(*state["grams"]))
    torch.testing.assert_close(torch.trace(f[0].matrix) / 3, torch.trace(f[1].matrix) / 5)


class ReferenceKLShampoo:
    """Lin et al. (2025) as written: simultaneous KL factor updates from the minibatch gradient,
    (U_i + eps I)^(-1/2) per factor at refresh steps (t % f == 0 and every step while t < f),
    EMA momentum, no grafting. Factors are rebalanced to a common mean eigenvalue (which leaves
    their Kronecker product, the estimated covariance, unchanged) after each update."""

    def __init__(self, params, *, lr, mu, beta, eps, delta, f, wd):
        self.w = [p.detach().clone() for p in params]
        self.lr, self.mu, self.beta, self.eps, self.delta, self.f, self.wd = lr, mu, beta, eps, delta, f, wd
        self.S = [None] * len(self.w)
        self.P = [None] * len(self.w)
        self.M = [torch.zeros_like(w) for w in self.w]
        self.t = 0

    def step(self, grads):
        for n, g in enumerate(grads):
            k, shape = g.dim(), g.shape
            total = g.numel()
            if self.S[n] is None:
                self.S[n] = [unfold(g, i) @ unfold(g, i).T / (total // shape[i]) for i in range(k)]
            else:
                old = self.S[n]
                new = []
                for i in range(k):
                    inv = kron_all([torch.linalg.inv(old[j] + self.delta * torch.trace(old[j]) / shape[j]
                                                     * torch.eye(shape[j], dtype=g.dtype)) for j in range(k) if j != i])
                    gi = unfold(g, i)
                    new.append(self.beta * old[i] + (1 - self.beta) * gi @ inv @ gi.T / (total // shape[i]))
                means = [torch.trace(s) / s.shape[0] for s in new]  # rescaled to a common mean eigenvalue
                common = torch.prod(torch.stack(means)) ** (1.0 / k)
                self.S[n] = [s * common / m for s, m in zip(new, means)]
            if self.t % self.f == 0 or self.t < self.f:
                means = [torch.trace(s) / s.shape[0] for s in self.S[n]]
                common = torch.prod(torch.stack(means)) ** (1.0 / k)
                self.P[n] = []
                for s, m in zip(self.S[n], means):
                    vals, vecs = torch.linalg.eigh(s * common / m)
                    self.P[n].append((vecs * (vals.clamp_min(0) + self.eps) ** -0.5) @ vecs.T)
            self.M[n] = self.mu * self.M[n] + (1 - self.mu) * g
            self.w[n] = self.w[n] * (1 - self.lr * self.wd) - self.lr * fold_product(self.M[n], self.P[n])
        self.t += 1


def test_kl_shampoo_matches_the_paper_algorithm():
    gen = torch.Generator().manual_seed(4)
    shapes = [(5, 3), (3, 2, 4)]
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
    ref = ReferenceKLShampoo(params, lr=0.01, mu=0.9, beta=0.8, eps=1e-3, delta=1e-2, f=3, wd=0.01)
    opt = curvkit.KL_Shampoo(params, lr=0.01, momentum=0.9, stat_decay=0.8, damping=1e-3, kl_damping=1e-2,
                             invert_every=3, weight_decay=0.01, relative_damping=False)
    for _ in range(7):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step(grads)
        for p, w in zip(params, ref.w):
            torch.testing.assert_close(p.detach(), w, rtol=1e-8, atol=1e-10)


def test_kl_estimator_and_presets_conform():
    # check_decay: a KL sample depends on the current factors, so update(decay=0) does not forget
    # earlier evidence (see the report: contract change for self-referential estimators)
    check_estimator(curvkit.TensorNormal(estimate="kl"), check_decay=False)
    check_estimator(curvkit.TensorNormal(estimate="kl", evidence="empirical"), check_decay=False)
    check_part("method", "TNT_KL", options={"lr": 1e-3})
    check_part("method", "KL_Shampoo")
    check_part("method", "KL_Shampoo", options={"route_unmodelled": "adamw", "max_factor_dim": 4})


def test_tnt_kl_is_tnt_with_the_kl_estimate_and_warm_starts():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = curvkit.TNT_KL(model.parameters(), lr=1e-3, curvature_every=2, invert_every=4)
    assert opt.estimator.config.estimate == "kl" and opt.estimator.config.evidence == "sampled"
    assert opt.inverter.config.power == 1.0 and opt.param_groups[0]["invert_every"] == 4
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(8, 4, generator=gen) for _ in range(3)]
    assert opt.warm_start(batches, model, loss="cross_entropy") == 3
    for t in range(4):
        x, y = torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        out = model(x)
        opt.update_curvature(out, loss="cross_entropy")
        nn.functional.cross_entropy(out, y).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("kwargs, match", [({"estimate": "mle"}, "estimate"), ({"kl_damping": 0.0}, "kl_damping")])
def test_kl_options_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        curvkit.TensorNormal(**kwargs)
