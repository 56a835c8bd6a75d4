"""SOAP (Vyas et al. 2024) against a float64 reference written from the paper's Algorithm 3,
and the eigenbasis parts it is built from."""

import pytest
import torch
from torch import nn

import curvkit
from curvkit.operators import EigenBasis
from curvkit.testing import check_inverter, check_part, check_preconditioner

from .test_conformance_core import fractional_power_reference


def unfold(t, mode):
    return t.movedim(mode, 0).reshape(t.shape[mode], -1)


def fold_product(t, mats):
    """t x_1 mats[0] ... x_k mats[k-1] with explicit unfoldings (None = identity)."""
    for mode, m in enumerate(mats):
        if m is None:
            continue
        moved = t.movedim(mode, 0)
        t = (m @ moved.reshape(moved.shape[0], -1)).reshape(moved.shape).movedim(0, mode)
    return t


class ReferenceSOAP:
    """Algorithm 3 of the paper with the engine's schedule: statistics of step t enter the basis
    of step t, bases recomputed by eigh at t % f == 0 and at every step while t < f."""

    def __init__(self, params, *, lr, b1, b2, bs, eps, f, wd, rotate=False, qr=False):
        self.w = [p.detach().clone() for p in params]
        self.lr, self.b1, self.b2, self.bs, self.eps, self.f, self.wd = lr, b1, b2, bs, eps, f, wd
        self.rotate, self.qr = rotate, qr
        self.L = [None] * len(self.w)
        self.Q = [None] * len(self.w)
        self.M = [torch.zeros_like(w) for w in self.w]
        self.V = [torch.zeros_like(w) for w in self.w]
        self.t = 0

    def step(self, grads):
        t = self.t
        for n, g in enumerate(grads):
            k = g.dim()
            grams = [unfold(g, i) @ unfold(g, i).T for i in range(k)]
            if self.L[n] is None:
                self.L[n] = grams
            else:
                self.L[n] = [self.bs * a + (1 - self.bs) * b for a, b in zip(self.L[n], grams)]
            if (t % self.f == 0 or t < self.f) and self.qr and self.Q[n] is not None:
                # the authors' warm-started refresh: columns sorted by their estimated eigenvalue
                # (descending), Adam's second moment permuted with them (carry), one power step, QR
                new = []
                for i, (m, o) in enumerate(zip(self.L[n], self.Q[n])):
                    idx = torch.argsort(torch.diagonal(o.T @ m @ o), descending=True)
                    o = o[:, idx]
                    if not self.rotate:
                        self.V[n] = self.V[n].index_select(i, idx)
                    new.append(torch.linalg.qr(m @ o)[0])
                if self.rotate:
                    self.V[n] = fold_product(self.V[n], [(qn.T @ qo) ** 2 for qn, qo in zip(new, self.Q[n])])
                self.Q[n] = new
            elif t % self.f == 0 or t < self.f:
                new = [torch.linalg.eigh(s)[1] for s in self.L[n]]
                if self.rotate and self.Q[n] is not None:
                    self.V[n] = fold_product(self.V[n], [(qn.T @ qo) ** 2 for qn, qo in zip(new, self.Q[n])])
                self.Q[n] = new
            Q = self.Q[n]
            QT = [q.T for q in Q]
            self.M[n] = self.b1 * self.M[n] + (1 - self.b1) * g
            g_rot = fold_product(g, QT)
            self.V[n] = self.b2 * self.V[n] + (1 - self.b2) * g_rot**2
            n_rot = fold_product(self.M[n], QT) / (self.V[n].sqrt() + self.eps)
            step_size = self.lr * (1 - self.b2 ** (t + 1)) ** 0.5 / (1 - self.b1 ** (t + 1))
            self.w[n] = self.w[n] * (1 - self.lr * self.wd) - step_size * fold_product(n_rot, Q)
        self.t += 1


@pytest.mark.parametrize("rotate", [False, True])
def test_soap_matches_the_paper_algorithm_over_basis_refreshes(rotate):
    gen = torch.Generator().manual_seed(11)
    shapes = [(5, 3), (4, 4), (3, 2, 4)]
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
    kw = dict(lr=0.01, b1=0.9, b2=0.95, bs=0.8, eps=1e-8, f=3, wd=0.02)
    ref = ReferenceSOAP(params, rotate=rotate, **kw)
    opt = curvkit.SOAP(params, lr=0.01, betas=(0.9, 0.95), shampoo_beta=0.8, precondition_frequency=3,
                       weight_decay=0.02, on_refresh="rotate" if rotate else "carry")
    versions = []
    for _ in range(8):  # refreshes at t = 0, 1, 2, 3, 6
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step(grads)
        versions.append(opt.block_state(0)["inverses"][0].version)
        for p, w in zip(params, ref.w):
            torch.testing.assert_close(p.detach(), w, rtol=1e-9, atol=1e-11)
    assert versions == [1, 2, 3, 4, 4, 4, 5, 5]
    assert all(isinstance(e, EigenBasis) for e in opt.block_state(2)["inverses"])


@pytest.mark.parametrize("rotate", [False, True])
def test_soap_qr_refresh_matches_the_authors_warm_started_power_step(rotate):
    """refresh="qr": first basis by eigh, later ones by one QR power step from the previous basis
    (columns sorted by estimated eigenvalue, the second moment permuted with them), as the
    authors' code does; checked over the refreshes at t = 0, 1, 2, 3, 6 and against eigh."""
    gen = torch.Generator().manual_seed(21)
    shapes = [(5, 3), (4, 4), (3, 2, 4)]
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
    start = [p.detach().clone() for p in params]
    kw = dict(lr=0.01, b1=0.9, b2=0.95, bs=0.8, eps=1e-8, f=3, wd=0.02)
    ref = ReferenceSOAP(params, rotate=rotate, qr=True, **kw)
    eigh_ref = ReferenceSOAP(params, rotate=rotate, **kw)
    opt = curvkit.SOAP(params, lr=0.01, betas=(0.9, 0.95), shampoo_beta=0.8, precondition_frequency=3,
                       weight_decay=0.02, on_refresh="rotate" if rotate else "carry", basis_refresh="qr")
    for _ in range(8):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step(grads)
        eigh_ref.step(grads)
        for p, w in zip(params, ref.w):
            torch.testing.assert_close(p.detach(), w, rtol=1e-9, atol=1e-11)
    assert opt.block_state(0)["inverses"][0].version == 5
    # the warm-started bases are not eigh's: the test above can tell the two refreshes apart
    moved = [float(((a - s) - (b - s)).abs().max()) for a, b, s in zip(ref.w, eigh_ref.w, start)]
    assert max(moved) > 1e-7, moved
    # and the QR basis is orthonormal and close to an eigenbasis of the factor it refreshed
    entry = opt.block_state(0)["inverses"][0]
    eye = torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(entry.vectors.T @ entry.vectors, eye, rtol=0, atol=1e-12)


def test_qr_refresh_converges_to_the_eigenbasis_and_first_refresh_is_eigh():
    """Repeated warm-started steps on a fixed factor are subspace iteration: the basis converges
    to the eigenvectors (up to sign and column order) and the values to the damped powers."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 6, 6, generator=gen, dtype=torch.float64)
    m = x @ x.transpose(-1, -2) + torch.diag(torch.arange(1.0, 7.0, dtype=torch.float64))
    damping, order = torch.full((2,), 0.1, dtype=torch.float64), torch.tensor([1, 2])
    inv = curvkit.Eigenbasis(refresh="qr")
    cold = inv.invert(m, damping=damping, order=order)
    eigh = curvkit.Eigenbasis().invert(m, damping=damping, order=order)
    torch.testing.assert_close(cold[0], eigh[0])  # no previous: eigh
    vecs = torch.linalg.qr(torch.randn(2, 6, 6, generator=gen, dtype=torch.float64))[0]
    for _ in range(300):
        vecs, vals = inv.invert(m, damping=damping, order=order, previous=vecs)
    overlap = (vecs.transpose(-1, -2) @ eigh[0]).abs()  # a permutation matrix at convergence
    torch.testing.assert_close(overlap.max(dim=-1).values, torch.ones(2, 6, dtype=torch.float64), rtol=0, atol=1e-8)
    torch.testing.assert_close(vals.sort(dim=-1).values, eigh[1].sort(dim=-1).values, rtol=1e-8, atol=0)
    with pytest.raises(ValueError, match="refresh"):
        curvkit.Eigenbasis(refresh="power")


def test_rotate_differs_from_carry():
    """The two refresh policies are distinguishable (so the test above can fail for each)."""
    gen = torch.Generator().manual_seed(12)
    out = []
    for rotate in (False, True):
        ref = ReferenceSOAP([torch.zeros(5, 3, dtype=torch.float64)], lr=0.01, b1=0.9, b2=0.95, bs=0.5,
                            eps=1e-8, f=2, wd=0.0, rotate=rotate)
        g = torch.Generator().manual_seed(13)
        for _ in range(5):
            ref.step([torch.randn(5, 3, generator=g, dtype=torch.float64)])
        out.append(ref.w[0])
    assert float((out[0] - out[1]).abs().max()) > 1e-6


@pytest.mark.parametrize("refresh", ["eigh", "qr"])
@pytest.mark.parametrize("power", [1.0, "1/2k"])
def test_eigenbasis_inverter_conforms_and_reconstructs_the_damped_power(power, refresh):
    """check_inverter takes eigenbasis inverters: (vectors, values) checked, Q diag(values) Q^T
    compared with the dense reference, cold and (qr) warm-started from the exact eigenbasis."""
    check_inverter(curvkit.Eigenbasis(power=power, refresh=refresh), reference=fractional_power_reference(power))
    check_inverter(curvkit.Eigenbasis(power=power, refresh=refresh), dtype=torch.float32)
    check_part("inverter", "eigenbasis", options={"refresh": refresh})
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(4, 6, 6, generator=gen, dtype=torch.float64)
    m = a @ a.transpose(-1, -2)
    vecs, vals = curvkit.Eigenbasis(power=power).invert(m, damping=torch.full((4,), 0.1, dtype=torch.float64),
                                                       order=torch.tensor([1, 2, 3, 2]))
    eye = torch.eye(6, dtype=torch.float64).expand(4, 6, 6)
    torch.testing.assert_close(vecs.transpose(-1, -2) @ vecs, eye, rtol=0, atol=1e-12)
    assert bool((vals[:, 1:] <= vals[:, :-1] + 1e-12).all())  # ascending eigenvalues -> descending powers
    assert curvkit.Eigenbasis.produces == "eigenbasis"


def test_adam_eigenbasis_without_a_basis_is_adam_and_conforms():
    check_part("preconditioner", "adam_eigenbasis")
    check_preconditioner(curvkit.AdamEigenbasis(on_refresh="rotate"))
    pre = curvkit.AdamEigenbasis(beta1=0.9, beta2=0.99, eps=1e-8)
    from curvkit.testing import make_block

    block = make_block((3, 2))
    state = pre.init_state(block)
    gen = torch.Generator().manual_seed(4)
    m = torch.zeros(3, 2, dtype=torch.float64)
    v = torch.zeros(3, 2, dtype=torch.float64)
    for t in range(1, 4):
        g = torch.randn(3, 2, generator=gen, dtype=torch.float64)
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g * g
        expected = (1 - 0.99**t) ** 0.5 / (1 - 0.9**t) * m / (v.sqrt() + 1e-8)
        torch.testing.assert_close(pre.apply(block, state, m.clone(), None, gradient=g), expected)


def test_soap_preset_conforms_and_routes():
    check_part("method", "SOAP")
    check_part("method", "SOAP", options={"route_unmodelled": "adamw", "max_precond_dim": 4})
    opt = curvkit.SOAP([nn.Parameter(torch.zeros(3, 50)), nn.Parameter(torch.zeros(3))],
                       route_unmodelled="adamw", max_precond_dim=10)
    described = [opt.preconditioner.describe(b) for b in opt.blocks]
    assert described[0].startswith("modelled: Adam in the eigenbasis of 1 of 2 modes")
    assert described[1].startswith("modelled")
    with pytest.raises(ValueError, match="betas"):
        curvkit.SOAP([nn.Parameter(torch.zeros(2, 2))], betas=(0.9,))
    with pytest.raises(ValueError, match="on_refresh"):
        curvkit.SOAP([nn.Parameter(torch.zeros(2, 2))], on_refresh="reset")
    with pytest.raises(ValueError, match="refresh"):
        curvkit.SOAP([nn.Parameter(torch.zeros(2, 2))], basis_refresh="power")
    check_part("method", "SOAP", options={"basis_refresh": "qr"})


class _BrokenEigenbasis(curvkit.Eigenbasis):
    def __init__(self, fault, **kw):
        super().__init__(**kw)
        self.fault = fault

    def invert(self, matrices, *, damping, order, previous=None):
        vecs, vals = super().invert(matrices, damping=damping, order=order, previous=previous)
        if self.fault == "not orthonormal":
            return 1.01 * vecs, vals
        if self.fault == "wrong values":
            return vecs, 2 * vals
        if self.fault == "values shape":
            return vecs, vals[:, :-1]
        if self.fault == "warm modifies previous" and previous is not None:
            previous.mul_(-1)
        if self.fault == "warm values wrong" and previous is not None:
            return vecs, 2 * vals
        return vecs, vals


@pytest.mark.parametrize("fault,message", [
    ("not orthonormal", "not orthonormal"),
    ("wrong values", "reference"),
    ("values shape", "expected"),
    ("warm modifies previous", "previous"),
    ("warm values wrong", "warm-started\\) differs from the reference"),
])
def test_check_inverter_catches_broken_eigenbasis_inverters(fault, message):
    from curvkit.testing import ConformanceError

    with pytest.raises(ConformanceError, match=message):
        check_inverter(_BrokenEigenbasis(fault, refresh="qr"), reference=fractional_power_reference(1.0))
