"""K-BFGS inside the optimizer against an independent float64 re-implementation of one run.

The reference records each Linear layer's inputs, pre-activations and pre-activation gradients
with its own hooks (not curvkit's recorder), and recomputes A, H_a, the averaged pairs, the double
damping (scalar formulas) and the BFGS updates (product form) step by step.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import curvkit_kbfgs

D = torch.float64
LAM, MU1, BETA = 0.3, 0.2, 0.9


class Tap:
    """Keeps the last call's input, output and output gradient of a module."""

    def __init__(self, module: nn.Module) -> None:
        self.a = self.h = None
        module.register_forward_hook(self.hook)

    def hook(self, module, args, out):
        self.a, self.h = args[0].detach(), out
        out.retain_grad()

    def snapshot(self):
        a = torch.cat([self.a, torch.ones(len(self.a), 1, dtype=D)], 1)
        return a, self.h.detach().clone(), self.h.grad.detach().clone()


def product_bfgs(h, s, y):
    rho = 1.0 / float(s @ y)
    left = torch.eye(len(s), dtype=D) - rho * torch.outer(s, y)
    return left @ h @ left.T + rho * torch.outer(s, s)


def reference_damping(s, y, hy, mu2, form):
    sy, yhy = float(s @ y), float(y @ hy)
    if sy < MU1 * yhy:
        th = (1 - MU1) * yhy / (yhy - sy)
        s = th * s + (1 - th) * hy
    if form == "add":
        return s, y + mu2 * s
    sy, ss = float(s @ y), float(s @ s)
    if sy < mu2 * ss:
        th = (1 - mu2) * ss / (ss - sy)
        y = th * y + (1 - th) * s
    return s, y


@pytest.mark.parametrize("lm", ["interpolate", "add"])
def test_kbfgs_factors_follow_the_reference_step_by_step(lm):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(D)
    layers = [model[0], model[2]]
    taps = [Tap(m) for m in layers]
    opt = curvkit_kbfgs.KBFGS(model, lr=0.2, damping=LAM, lm=lm)
    mu = math.sqrt(LAM)
    ref = [dict(A=None, Ha=None, Hg=torch.eye(m.out_features, dtype=D),
                s=torch.zeros(m.out_features, dtype=D), y=torch.zeros(m.out_features, dtype=D)) for m in layers]
    accepted = 0
    for t in range(6):
        x, target = torch.randn(16, 4, dtype=D), torch.randint(0, 3, (16,))

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), target)
            loss.backward()
            return loss

        closure()
        before = [tap.snapshot() for tap in taps]
        for r, (a, _, _) in zip(ref, before):
            batch = a.T @ a / len(a)
            r["A"] = batch if r["A"] is None else BETA * r["A"] + (1 - BETA) * batch
            if r["Ha"] is None:  # inverted exactly once
                r["Ha"] = torch.linalg.inv(r["A"] + mu * torch.eye(len(batch), dtype=D))
        opt.step(closure)
        after = [tap.snapshot() for tap in taps]  # the closure's pass at theta_{t+1}
        for bi, (r, (a, h, g), (_, h2, g2)) in enumerate(zip(ref, before, after)):
            # activation side: Hessian-action pair
            s_a = r["Ha"] @ a.mean(0)
            y_a = (r["A"] + mu * torch.eye(len(s_a), dtype=D)) @ s_a
            r["Ha"] = product_bfgs(r["Ha"], s_a, y_a)
            # pre-activation side: averaged pair at per-example scale, double damping, BFGS
            r["s"] = BETA * r["s"] + (1 - BETA) * (h2.mean(0) - h.mean(0))
            r["y"] = BETA * r["y"] + (1 - BETA) * len(g) * (g2.mean(0) - g.mean(0))
            s_t, y_t = reference_damping(r["s"], r["y"], r["Hg"] @ r["y"], mu, lm)
            if float(s_t @ y_t) > 1e-4 * float(s_t @ s_t) * float(torch.linalg.norm(len(g) * g.mean(0))):
                r["Hg"] = product_bfgs(r["Hg"], s_t, y_t)
                accepted += 1
            st = opt.block_state(bi)["estimator"]
            torch.testing.assert_close(st["A"], r["A"], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(st["Ha"], r["Ha"], rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(st["Hg"], r["Hg"], rtol=1e-9, atol=1e-10)
            # secant equations of the accepted pairs, on the estimator's own matrices
            torch.testing.assert_close(st["Ha"] @ y_a, s_a, rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(st["Hg"] @ y_t, s_t, rtol=1e-9, atol=1e-10)
    assert accepted == 12


def test_direction_is_hg_times_momentum_times_ha():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4)).to(D)
    opt = curvkit_kbfgs.KBFGS(model, lr=0.5, momentum=0.0, dampening=0.0)
    x, y = torch.randn(8, 3, dtype=D), torch.randn(8, 4, dtype=D)

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).sum(1).mean()
        loss.backward()
        return loss

    for _ in range(3):
        closure()
        st = opt.block_state(0)["estimator"]
        hg, ha = st["Hg"].clone(), None if st["Ha"] is None else st["Ha"].clone()
        w0 = torch.cat([model[0].weight, model[0].bias[:, None]], 1).detach().clone()
        grad = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1)
        opt.step(closure)
        if ha is None:  # first step: H_a = (A + sqrt(lam) I)^-1 from this batch's A
            a = torch.cat([x, torch.ones(8, 1, dtype=D)], 1)
            ha = torch.linalg.inv(a.T @ a / 8 + math.sqrt(0.3) * torch.eye(4, dtype=D))
        w1 = torch.cat([model[0].weight, model[0].bias[:, None]], 1).detach()
        torch.testing.assert_close(w1, w0 - 0.5 * hg @ grad @ ha, rtol=1e-10, atol=1e-12)
