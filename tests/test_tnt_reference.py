"""The whole TNT update over several steps against a straightforward reference (Ren & Goldfarb 2021, Algorithm 1; docs/concepts/methods.rst).

The reference below is written from the algorithm's description only: explicit unfoldings,
dense Kronecker products and explicit inverses in float64; it shares no code with curvkit.
"""

import functools

import pytest
import torch
from torch import nn

import curvkit


def ref_view(p: torch.Tensor) -> torch.Tensor:
    if p.dim() == 4:  # conv (out, in, kh, kw) -> (out, in, kh*kw)
        return p.reshape(p.shape[0], p.shape[1], -1)
    return p


def ref_unfold(t: torch.Tensor, mode: int) -> torch.Tensor:
    perm = [mode] + [i for i in range(t.dim()) if i != mode]
    return t.permute(perm).reshape(t.shape[mode], -1)


class ReferenceTNT:
    def __init__(self, params, *, lr, momentum, damping, stat_decay, t1, t2, weight_decay):
        self.w = [p.detach().clone() for p in params]
        self.lr, self.mu, self.eps, self.beta = lr, momentum, damping, stat_decay
        self.t1, self.t2, self.wd = t1, t2, weight_decay
        self.stats = [None] * len(self.w)
        self.inv = [None] * len(self.w)
        self.mom = [torch.zeros_like(w) for w in self.w]
        self.t = 0

    def statistics(self, sampled_grads, *, decay=None):
        for n, g in enumerate(sampled_grads):
            v = ref_view(g)
            grams = [ref_unfold(v, i) @ ref_unfold(v, i).T for i in range(v.dim())]
            if self.stats[n] is None:
                self.stats[n] = grams
            else:
                b = self.beta if decay is None else decay
                self.stats[n] = [b * s + (1 - b) * gm for s, gm in zip(self.stats[n], grams)]

    def step(self, grads, sampled_grads=None):
        t = self.t
        if sampled_grads is not None:
            assert t % self.t1 == 0
            self.statistics(sampled_grads)
        if t % self.t2 == 0 or (t < self.t2 and t % self.t1 == 0):
            for n, s in enumerate(self.stats):
                dims = [x.shape[0] for x in s]
                k, total = len(dims), functools.reduce(lambda a, b: a * b, dims)
                c = (torch.trace(s[0]) / total) ** (1.0 / k)
                u = [si / (c ** (k - 1) * (total // d)) for si, d in zip(s, dims)]
                self.inv[n] = [torch.linalg.inv(ui + self.eps * torch.eye(ui.shape[0], dtype=ui.dtype)) for ui in u]
        for n, g in enumerate(grads):
            self.mom[n] = self.mu * self.mom[n] + g
            v = ref_view(self.mom[n])
            dense = functools.reduce(torch.kron, self.inv[n])
            p = (dense @ v.reshape(-1)).reshape(self.w[n].shape)
            self.w[n] = self.w[n] * (1 - self.lr * self.wd) - self.lr * p
        self.t += 1


def make_params(kind):
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3, bias=False))
    else:
        model = nn.Sequential(nn.Conv2d(2, 3, kernel_size=2), nn.Flatten(), nn.Linear(3 * 2 * 2, 2))
    return model.double()


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("t1,t2", [(1, 3), (2, 4)])
def test_tnt_matches_reference_over_steps(kind, t1, t2):
    model = make_params(kind)
    params = list(model.parameters())
    kw = dict(lr=0.05, momentum=0.9, damping=0.1, weight_decay=0.01)
    opt = curvkit.TNT(params, **kw, stat_decay=0.8, curvature_every=t1, invert_every=t2)
    ref = ReferenceTNT(params, **kw, stat_decay=0.8, t1=t1, t2=t2)
    for t in range(10):  # covers the early phase (t < T2), then T1 and T2 firing
        sampled = [torch.randn_like(p) for p in params]
        grads = [torch.randn_like(p) for p in params]
        took = opt.update_curvature(grads=sampled)
        assert took == (t % t1 == 0)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step(grads, sampled if took else None)
        for p, w in zip(params, ref.w):
            torch.testing.assert_close(p.detach(), w, rtol=1e-9, atol=1e-11)


def test_warm_start_uses_exact_mean_and_skips_first_statistics():
    model = make_params("mlp")
    params = list(model.parameters())
    kw = dict(lr=0.05, momentum=0.5, damping=0.1, weight_decay=0.0)
    opt = curvkit.TNT(params, **kw, stat_decay=0.9, curvature_every=1, invert_every=2)
    ref = ReferenceTNT(params, **kw, stat_decay=0.9, t1=1, t2=2)
    batches = [[torch.randn_like(p) for p in params] for _ in range(3)]
    # warm start through the low-level path: forward returns a loss whose gradient is the batch
    it = iter(batches)

    def forward(_):
        g = next(it)
        return sum((p * gi).sum() for p, gi in zip(params, g))

    opt_emp = curvkit.TNT(params, **kw, evidence="empirical", curvature_every=1, invert_every=2)
    assert opt_emp.warm_start(range(3), forward) == 3
    for n, g in enumerate(batches):
        ref.statistics(g, decay=n / (n + 1))
    assert not opt_emp.statistics_due()
    for t in range(4):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt_emp.step()
        ref.step(grads, grads if t > 0 else None)
        for p, w in zip(params, ref.w):
            torch.testing.assert_close(p.detach(), w, rtol=1e-9, atol=1e-11)
    del opt


def test_update_curvature_feeds_the_sampled_gradient():
    model = make_params("mlp")
    params = list(model.parameters())
    opt = curvkit.TNT(params, seed=7)
    x = torch.randn(16, 5, dtype=torch.float64)
    out = model(x)
    gen_state = opt._generator(out.device).get_state()
    assert opt.update_curvature(out, loss="cross_entropy")
    gen = torch.Generator()
    gen.set_state(gen_state)
    expected = torch.autograd.grad(curvkit.fisher.sampled_loss(out, "cross_entropy", generator=gen), params, retain_graph=True)
    for b, g in zip(opt.blocks, expected):
        v = ref_view(g)
        st = opt.block_state(b)["estimator"]
        for i, s in enumerate(st["grams"]):
            torch.testing.assert_close(s, ref_unfold(v, i) @ ref_unfold(v, i).T)
    # the graph was retained for the user's own backward
    nn.functional.cross_entropy(out, torch.zeros(16, dtype=torch.long)).backward()


def test_sampled_warm_start_is_exact_mean_of_sampled_grams():
    model = make_params("mlp")
    params = list(model.parameters())
    opt = curvkit.TNT(params, seed=3)
    xs = [torch.randn(8, 5, dtype=torch.float64) for _ in range(3)]
    gen = torch.Generator()
    gen.set_state(opt._generator(torch.device("cpu")).get_state())
    expected = [[torch.zeros(d, d, dtype=torch.float64) for d in ref_view(p).shape] for p in params]
    for x in xs:
        grads = torch.autograd.grad(curvkit.fisher.sampled_loss(model(x), "cross_entropy", generator=gen), params)
        for e, g in zip(expected, grads):
            v = ref_view(g)
            for i in range(v.dim()):
                e[i] += ref_unfold(v, i) @ ref_unfold(v, i).T / len(xs)
    assert opt.warm_start(xs, model, loss="cross_entropy") == 3
    for b, e in zip(opt.blocks, expected):
        for s, ref in zip(opt.block_state(b)["estimator"]["grams"], e):
            torch.testing.assert_close(s, ref, rtol=1e-10, atol=1e-12)
    assert not opt.statistics_due()  # the first step takes no new statistics
    out = model(xs[0])
    assert opt.update_curvature(out, loss="cross_entropy") is False
