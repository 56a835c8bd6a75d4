"""Dense float64 references for Shampoo, written without curvkit's contractions or inverters.

Unfoldings by explicit movedim/reshape, matrix powers by scipy's fractional_matrix_power (a
Schur-Pade method, unrelated to both eigh and the Newton iteration), preconditioning by an
explicit Kronecker product built with torch.kron.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch


def unfold(g: torch.Tensor, mode: int) -> torch.Tensor:
    return g.movedim(mode, 0).reshape(g.shape[mode], -1)


def inverse_root(s: torch.Tensor, eps: float, p: float) -> torch.Tensor:
    """(S + eps I)^(-1/p) in float64 by scipy."""
    m = s.double().numpy() + eps * np.eye(s.shape[0])
    return torch.from_numpy(np.real(scipy.linalg.fractional_matrix_power(m, -1.0 / p)))


def kron_all(mats: list[torch.Tensor]) -> torch.Tensor:
    out = mats[0]
    for m in mats[1:]:
        out = torch.kron(out, m)
    return out


def dense_direction(m: torch.Tensor, roots: list[torch.Tensor | None]) -> torch.Tensor:
    """(V_1 kron ... kron V_k) vec(M), row-major vec, identity where a root is None."""
    mats = [torch.eye(d, dtype=torch.float64) if v is None else v for d, v in zip(m.shape, roots)]
    return (kron_all(mats) @ m.double().reshape(-1)).reshape(m.shape)


class ReferenceShampoo:
    """Shampoo on one view-shaped tensor, step by step, as Gupta et al. 2018 (Algorithm 2) and docs/plugins/shampoo.rst state it."""

    def __init__(self, shape, *, lr, eps, momentum, stat_decay=0.9, accumulate="ema",
                 t1=1, t2=20, relative=False, weight_decay=0.0):
        self.shape, self.lr, self.eps, self.mu = tuple(shape), lr, eps, momentum
        self.beta, self.accumulate, self.t1, self.t2 = stat_decay, accumulate, t1, t2
        self.relative, self.wd = relative, weight_decay
        self.stats = None
        self.n = 0
        self.roots = None
        self.buf = None
        self.t = 0

    def step(self, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        g = g.double()
        k = g.dim()
        if self.t % self.t1 == 0:
            grams = [unfold(g, i) @ unfold(g, i).T for i in range(k)]
            if self.stats is None:
                self.stats = grams
            elif self.accumulate == "ema":
                self.stats = [self.beta * s + (1 - self.beta) * h for s, h in zip(self.stats, grams)]
            else:
                self.stats = [s + h for s, h in zip(self.stats, grams)]
            self.n += 1
        if self.t % self.t2 == 0 or (self.t < self.t2 and self.t % self.t1 == 0):
            roots = []
            for s in self.stats:
                eps = self.eps
                if self.relative:
                    lam = float(torch.linalg.eigvalsh(s).max())
                    eps = eps * lam if lam > 0 else eps
                roots.append(inverse_root(s, eps, 2 * k))
            self.roots = roots
        self.buf = g.clone() if self.buf is None else self.mu * self.buf + g
        direction = dense_direction(self.buf, self.roots)
        self.t += 1
        return w.double() * (1 - self.lr * self.wd) - self.lr * direction
