"""The quasi-Newton kernels against dense float64 references written out in full."""

from __future__ import annotations

import pytest
import torch

from curvkit_kbfgs.bfgs import (
    accept_pair,
    bfgs_inverse_update,
    bfgs_inverse_update_where,
    double_damping,
    lbfgs_apply,
    lbfgs_matrix,
    restart_,
    restart_where,
)
from curvkit_kbfgs.bfgs import _symmetric_cross

D = torch.float64


def spd(d: int, gen: torch.Generator, *, floor: float = 0.1) -> torch.Tensor:
    x = torch.randn(d, d, generator=gen, dtype=D)
    return x @ x.T / d + floor * torch.eye(d, dtype=D)


def dense_bfgs(h: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The product form (I - rho s y^T) H (I - rho y s^T) + rho s s^T."""
    rho = 1.0 / float(s @ y)
    left = torch.eye(len(s), dtype=D) - rho * torch.outer(s, y)
    return left @ h @ left.T + rho * torch.outer(s, s)


def curvature_pairs(d: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k pairs with s^T y > 0: y = B s + small noise for a fixed SPD B."""
    b = spd(d, gen, floor=0.5)
    s = torch.randn(k, d, generator=gen, dtype=D)
    y = s @ b + 0.05 * torch.randn(k, d, generator=gen, dtype=D)
    assert bool(((s * y).sum(1) > 0).all())
    return s, y


@pytest.mark.parametrize("seed", range(5))
def test_bfgs_update_is_the_product_form_and_satisfies_the_secant_equation(seed):
    gen = torch.Generator().manual_seed(seed)
    d = 6
    h = torch.linalg.inv(spd(d, gen))
    h = 0.5 * (h + h.T)  # exactly symmetric input
    s, y = curvature_pairs(d, 1, gen)
    new = bfgs_inverse_update(h, s[0], y[0])
    torch.testing.assert_close(new, dense_bfgs(h, s[0], y[0]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new @ y[0], s[0], rtol=1e-10, atol=1e-12)  # H+ y = s
    assert torch.equal(new, new.T)
    assert float(torch.linalg.eigvalsh(new).min()) > 0


@pytest.mark.parametrize("seed", range(3))
def test_masked_bfgs_update_is_the_update_or_exactly_unchanged(seed):
    gen = torch.Generator().manual_seed(seed)
    d = 7
    h = torch.linalg.inv(spd(d, gen))
    h = 0.5 * (h + h.T)
    s, y = curvature_pairs(d, 1, gen)
    yes, no = torch.tensor(True), torch.tensor(False)
    taken = bfgs_inverse_update_where(h, s[0], y[0], yes)
    torch.testing.assert_close(taken, dense_bfgs(h, s[0], y[0]), rtol=1e-12, atol=1e-12)
    assert torch.equal(taken, taken.T)
    assert torch.equal(bfgs_inverse_update_where(h, s[0], y[0], no), h)
    # a rejected pair that is not finite (or has s^T y <= 0) must not leak into H either
    bad_y = y[0].clone()
    bad_y[2] = float("nan")
    assert torch.equal(bfgs_inverse_update_where(h, s[0], bad_y, no), h)
    assert torch.equal(bfgs_inverse_update_where(h, s[0], -y[0], no), h)


def test_restart_where_gives_a_scaled_identity_or_the_matrix():
    h = torch.full((4, 4), float("nan"), dtype=D)
    assert torch.equal(restart_where(h, torch.tensor(True), 2.5), 2.5 * torch.eye(4, dtype=D))
    g = torch.randn(4, 4, dtype=D)
    assert torch.equal(restart_where(g, torch.tensor(False), 2.5), g)


@pytest.mark.parametrize("d", [4, 70])  # below and above the size of the bitwise masks
def test_in_place_restart_is_restart_where_on_the_same_tensor(d):
    gen = torch.Generator().manual_seed(d)
    for dtype in (D, torch.float32):
        g = torch.randn(d, d, generator=gen, dtype=D).to(dtype)
        g[0, 1] = -0.0
        for reset in (torch.tensor(True), torch.tensor(False)):
            ref = restart_where(g, reset, 2.5)
            work = g.clone()
            out = restart_(work, reset, 2.5)
            assert out is work
            assert torch.equal(out.view(torch.int64 if dtype == D else torch.int32),
                               ref.view(torch.int64 if dtype == D else torch.int32))
        poisoned = torch.full((d, d), float("nan"), dtype=dtype)
        assert torch.equal(restart_(poisoned, torch.tensor(True), 2.5), 2.5 * torch.eye(d, dtype=dtype))


@pytest.mark.parametrize("d", [7, 785, 1001])
def test_symmetric_cross_is_c_plus_c_transposed_bit_for_bit(d):
    gen = torch.Generator().manual_seed(d)
    for dtype in (D, torch.float32):
        a, b = (torch.randn(d, generator=gen, dtype=D).to(dtype) for _ in range(2))
        c = torch.outer(a, b)
        got = _symmetric_cross(a, b)
        assert torch.equal(got, c + c.T) and torch.equal(got, got.T)


def powell_case(kind: str, gen: torch.Generator, d: int = 5):
    h = torch.linalg.inv(spd(d, gen))
    s = torch.randn(d, generator=gen, dtype=D)
    y = torch.randn(d, generator=gen, dtype=D)
    if kind == "negative":  # s^T y < 0: Powell must act
        y = y - (2.0 * float(s @ y) / float(s @ s) + 1.0) * s if float(s @ y) >= 0 else y
    elif kind == "good":  # y = H^-1 s: s^T y = y^T H y, Powell does not act
        y = torch.linalg.solve(h, s)
    return h, s, y


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["negative", "random", "good"])
@pytest.mark.parametrize("form", ["interpolate", "add"])
def test_double_damping_guarantees_its_bounds(seed, kind, form):
    gen = torch.Generator().manual_seed(100 * seed + len(kind))
    h, s, y = powell_case(kind, gen)
    mu1, mu2 = 0.2, 0.3 ** 0.5
    hy = h @ y
    s_t, y_t = double_damping(s, y, hy, mu1=mu1, mu2=mu2, form=form)
    sy, yhy = float(s @ y), float(y @ hy)
    # Powell (inverse form): s~^T y >= mu1 y^T H y, with equality when it acted, s~ = s otherwise
    powell_acted = sy < mu1 * yhy
    assert float(s_t @ y) >= mu1 * yhy - 1e-12 * abs(yhy)
    if powell_acted:
        assert float(s_t @ y) == pytest.approx(mu1 * yhy, rel=1e-10)
        theta = (1 - mu1) * yhy / (yhy - sy)
        torch.testing.assert_close(s_t, theta * s + (1 - theta) * hy, rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(s_t, s, rtol=0, atol=0)
    sts = float(s_t @ s_t)
    if form == "add":  # Levenberg-Marquardt: y~ = y + mu2 s~
        torch.testing.assert_close(y_t, y + mu2 * s_t, rtol=0, atol=1e-15)
        assert float(s_t @ y_t) >= mu1 * yhy + mu2 * sts - 1e-10
    else:  # Powell with B = I: s~^T y~ >= mu2 s~^T s~ (equality when it acted)
        assert float(s_t @ y_t) >= mu2 * sts * (1 - 1e-12)
        if float(s_t @ y) < mu2 * sts:
            assert float(s_t @ y_t) == pytest.approx(mu2 * sts, rel=1e-10)
        else:
            torch.testing.assert_close(y_t, y, rtol=0, atol=0)
    # the damped pair always gives an SPD update that satisfies the secant equation
    new = bfgs_inverse_update(h, s_t, y_t)
    torch.testing.assert_close(new @ y_t, s_t, rtol=1e-9, atol=1e-11)
    assert float(torch.linalg.eigvalsh(new).min()) > 0


@pytest.mark.parametrize("k", [0, 1, 4, 9])
def test_lbfgs_two_loop_and_compact_form_equal_dense_bfgs_from_identity(k):
    gen = torch.Generator().manual_seed(k)
    d = 7
    s, y = curvature_pairs(d, k, gen)
    dense = torch.eye(d, dtype=D)
    for i in range(k):
        dense = dense_bfgs(dense, s[i], y[i])
    torch.testing.assert_close(lbfgs_matrix(s, y), dense, rtol=1e-10, atol=1e-10)
    v = torch.randn(d, generator=gen, dtype=D)
    torch.testing.assert_close(lbfgs_apply(s, y, v), dense @ v, rtol=1e-10, atol=1e-10)
    many = torch.randn(d, 3, generator=gen, dtype=D)
    torch.testing.assert_close(lbfgs_apply(s, y, many), dense @ many, rtol=1e-10, atol=1e-10)


def test_accept_pair_rejects_nonpositive_tiny_and_nonfinite_pairs():
    s = torch.tensor([1.0, 0.0], dtype=D)
    ref = torch.tensor([3.0, 4.0], dtype=D)  # norm 5
    assert bool(accept_pair(s, torch.tensor([1.0, 0.0], dtype=D), ref, tol=1e-4))
    assert not bool(accept_pair(s, torch.tensor([-1.0, 0.0], dtype=D), ref, tol=1e-4))
    assert not bool(accept_pair(s, torch.tensor([0.0, 1.0], dtype=D), ref, tol=1e-4))  # s^T y = 0
    # s^T y = 4e-4 <= tol * s^T s * |ref| = 5e-4: skipped; 6e-4 is accepted
    assert not bool(accept_pair(s, torch.tensor([4e-4, 0.0], dtype=D), ref, tol=1e-4))
    assert bool(accept_pair(s, torch.tensor([6e-4, 0.0], dtype=D), ref, tol=1e-4))
    assert not bool(accept_pair(s, torch.tensor([float("nan"), 0.0], dtype=D), ref, tol=1e-4))
    assert not bool(accept_pair(torch.zeros(2, dtype=D), torch.ones(2, dtype=D), ref, tol=1e-4))
    # an infinity where s is zero (0 * inf), in s, or in the reference: not finite, rejected
    inf = float("inf")
    assert not bool(accept_pair(s, torch.tensor([1.0, inf], dtype=D), ref, tol=1e-4))
    assert not bool(accept_pair(s, torch.tensor([inf, 0.0], dtype=D), ref, tol=1e-4))  # s^T y = inf > rule
    assert not bool(accept_pair(torch.tensor([1.0, -inf], dtype=D), torch.tensor([1.0, 1.0], dtype=D), ref, tol=1e-4))
    assert not bool(accept_pair(s, torch.tensor([1.0, 0.0], dtype=D), torch.tensor([inf, 0.0], dtype=D), tol=0.0))
    assert not bool(accept_pair(s, torch.tensor([1.0, 0.0], dtype=D), torch.tensor([float("nan"), 0.0], dtype=D), tol=0.0))


def test_double_damping_rejects_an_unknown_form():
    with pytest.raises(ValueError, match="form"):
        double_damping(torch.ones(2), torch.ones(2), torch.ones(2), mu1=0.2, mu2=0.5, form="levenberg")
