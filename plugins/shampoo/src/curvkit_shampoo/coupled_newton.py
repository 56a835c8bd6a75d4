r"""The ``coupled_newton`` inverter: inverse p-th roots :math:`(A + \epsilon I)^{-1/p}` without
an eigendecomposition.

The coupled Newton iteration for the inverse :math:`p`-th root of an SPD matrix :math:`B`
(Guo & Higham, SIAM J. Matrix Anal. Appl. 2006; the Shampoo authors' solver) keeps two matrices,

.. math::
    X_0 = z^{1/p} I, \quad M_0 = z B, \qquad
    T_j = \frac{(p + 1) I - M_j}{p}, \quad X_{j+1} = X_j T_j, \quad M_{j+1} = T_j^{\,p} M_j ,

with the invariant :math:`M_j = X_j^p B` (all iterates are polynomials in :math:`B`, so they
commute). :math:`M_j \to I` and hence :math:`X_j \to B^{-1/p}` when every eigenvalue of
:math:`M_0` lies in :math:`(0, p + 1)`; the scale :math:`z = (p + 1) / (2 \|B\|_F)` puts them in
:math:`(0, (p+1)/2]` since :math:`\|B\|_F \ge \lambda_{\max}(B)`. Each eigenvalue :math:`m`
follows :math:`m \mapsto m ((p + 1 - m)/p)^p`: small ones grow by about :math:`((p+1)/p)^p \ge 2`
per step, and once :math:`e_j = \|M_j - I\|_F < 1/2` the error falls quadratically. The
iteration stops, per matrix, when :math:`e_j \le` ``tolerance``, when :math:`e_j < 1/2` stops
decreasing (the rounding floor; the better iterate is kept), or after ``max_iterations``.

Cost per iteration: about :math:`(2 + \lceil\log_2 p\rceil + \mathrm{popcount}(p))` matrix
products, against one ``eigh`` for :mod:`curvkit`'s ``damped_eigen``: the two give the same matrix
(to the tolerance), the Newton form runs on matrix-multiply hardware.

``relative_damping`` uses :math:`\epsilon \lambda_{\max}(A)` (production Shampoo's epsilon relative
to the largest eigenvalue), with :math:`\lambda_{\max}` from ``power_iterations`` steps of the
power method (Rayleigh quotient); a zero matrix falls back to absolute damping.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

import curvkit
from curvkit import Inverter, PartConfig
from curvkit.config import check_positive, check_positive_int

__all__ = ["CoupledNewton", "CoupledNewtonConfig", "lambda_max", "parse_root"]

_ROOT = re.compile(r"^1/\(?(\d*)k\)?$")


def parse_root(power: float | str) -> tuple[int, int]:
    """``power`` as ``(fixed_root, per_order_multiple)``: root ``p = fixed_root``, or
    ``p = per_order_multiple * k`` for ``"1/2k"``-style powers."""
    if isinstance(power, str):
        match = _ROOT.match(power.replace(" ", ""))
        if not match:
            raise ValueError(
                f"power must be 1/p for a positive integer p (1.0, 0.5, 0.25, ...) or a root of the block "
                f"order such as '1/2k' or '1/k', got {power!r}"
            )
        return 0, int(match.group(1) or 1)
    check_positive("power", power)
    root = 1.0 / float(power)
    if abs(root - round(root)) > 1e-9 * root or round(root) < 1:
        raise ValueError(
            f"power must be 1/p for a positive integer p (coupled Newton computes integer roots), got "
            f"{power!r} (1/power = {root!r}); use damped_eigen for other powers"
        )
    return int(round(root)), 0


def lambda_max(matrices: Tensor, iterations: int) -> Tensor:
    r"""Largest eigenvalue of each symmetric PSD matrix of a batch ``(b, d, d)`` by the power
    method from a fixed start vector (the Rayleigh quotient after ``iterations`` products)."""
    d = matrices.shape[-1]
    v = torch.linspace(1.0, 2.0, d, dtype=matrices.dtype, device=matrices.device)
    v = (v / v.norm()).expand(matrices.shape[0], d).unsqueeze(-1)
    for _ in range(iterations):
        w = matrices @ v
        v = w / w.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(matrices.dtype).tiny)
    return (v.transpose(-1, -2) @ matrices @ v).reshape(-1).clamp_min(0)


@dataclass(frozen=True)
class CoupledNewtonConfig(PartConfig):
    """Options of :class:`CoupledNewton`.

    Attributes:
        power: the exponent :math:`1/p` of :math:`(A + \\epsilon I)^{-1/p}` with :math:`p` a
            positive integer, or ``"1/2k"`` (Shampoo: :math:`p = 2k` for a block of order
            :math:`k`) / ``"1/k"``.
        relative_damping: use :math:`\\epsilon \\lambda_{\\max}(A)` instead of :math:`\\epsilon`.
        tolerance: stop when :math:`\\|M_j - I\\|_F \\le` tolerance (relative error of the root
            about tolerance / p).
        max_iterations: iteration cap per matrix.
        float64: iterate in float64 whatever the input dtype (the result is cast back).
        power_iterations: power-method steps for :math:`\\lambda_{\\max}` (``relative_damping``).
    """

    power: float | str = "1/2k"
    relative_damping: bool = False
    tolerance: float = 1e-10
    max_iterations: int = 100
    float64: bool = True
    power_iterations: int = 100

    def __post_init__(self) -> None:
        parse_root(self.power)
        for name in ("relative_damping", "float64"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        check_positive("tolerance", self.tolerance)
        check_positive_int("max_iterations", self.max_iterations)
        check_positive_int("power_iterations", self.power_iterations)


def _newton_root(b: Tensor, p: int, tolerance: float, max_iterations: int) -> Tensor:
    """Coupled Newton for ``b^(-1/p)``, ``b`` a batch ``(n, d, d)`` of SPD matrices, per-matrix stop."""
    d = b.shape[-1]
    eye = torch.eye(d, dtype=b.dtype, device=b.device)
    z = (p + 1) / (2.0 * torch.linalg.matrix_norm(b).clamp_min(torch.finfo(b.dtype).tiny))
    x = z.pow(1.0 / p)[:, None, None] * eye
    m = z[:, None, None] * b
    err = torch.linalg.matrix_norm(m - eye)
    active = err > tolerance
    for _ in range(max_iterations):
        if not bool(active.any()):
            break
        t = ((p + 1) * eye - m) / p
        x_new = x @ t
        m_new = torch.linalg.matrix_power(t, p) @ m
        new_err = torch.linalg.matrix_norm(m_new - eye)
        take = active & ((new_err < err) | (err >= 0.5))
        keep = take[:, None, None]
        x = torch.where(keep, x_new, x)
        m = torch.where(keep, m_new, m)
        err = torch.where(take, new_err, err)
        active = take & (new_err > tolerance)
    return 0.5 * (x + x.transpose(-1, -2))


@curvkit.register("inverter", "coupled_newton")
class CoupledNewton(Inverter):
    r""":math:`(A + \epsilon I)^{-1/p}` by the coupled Newton iteration (see the module docstring).

    Batched: factors with the same root share every matrix product; each factor stops on its own
    tolerance, so a factor's result does not depend on the others in its batch.
    """

    Config = CoupledNewtonConfig

    def invert(self, matrices: Tensor, *, damping: Tensor, order: Tensor) -> Tensor:
        """Roots of a batch, grouped by root :math:`p`; each group is cast to the working dtype on
        its own and written back in the input dtype (no float64 copy of the whole batch)."""
        cfg = self.config
        work = torch.float64 if cfg.float64 else matrices.dtype
        eps_all = damping.to(device=matrices.device, dtype=work).reshape(-1)
        fixed, multiple = parse_root(cfg.power)
        if multiple:
            roots = sorted(set(int(r) for r in order.reshape(-1).tolist()))
            root_of = order.to(torch.int64).reshape(-1).to(matrices.device) * multiple
            roots = [r * multiple for r in roots]
        else:
            roots, root_of = [fixed], None
        single = len(roots) == 1
        out = None if single else torch.empty_like(matrices)
        for p in roots:
            idx = None if single else (root_of == p).nonzero().reshape(-1)
            part = matrices if idx is None else matrices[idx]
            eps = eps_all if idx is None else eps_all[idx]
            a = part.to(work)
            a = 0.5 * (a + a.transpose(-1, -2))
            if cfg.relative_damping:
                lam = lambda_max(a, cfg.power_iterations)
                eps = torch.where(lam > 0, eps * lam, eps)
            a.diagonal(dim1=-2, dim2=-1).add_(eps[:, None])
            root = _newton_root(a, p, cfg.tolerance, cfg.max_iterations).to(matrices.dtype)
            if single:
                return root
            out[idx] = root
        return out
