"""Inverters against dense references (scipy's fractional matrix power, explicit inverse)."""

import numpy as np
import pytest
import scipy.linalg
import torch

import curvkit


def random_psd(b, d, rank=None):
    rank = d if rank is None else rank
    x = torch.randn(b, d, rank, dtype=torch.float64)
    return x @ x.transpose(-1, -2) / rank


@pytest.mark.parametrize("power", [1.0, 0.5, 0.25, 1 / 6])
def test_damped_eigen_equals_dense_matrix_power(power):
    a = random_psd(3, 6)
    damping = torch.tensor([0.1, 0.01, 1.0], dtype=torch.float64)
    out = curvkit.DampedEigen(power=power).invert(a, damping=damping, order=torch.tensor([2, 2, 2]))
    for i in range(3):
        m = (a[i] + damping[i] * torch.eye(6, dtype=torch.float64)).numpy()
        ref = scipy.linalg.fractional_matrix_power(m, -power)
        np.testing.assert_allclose(out[i].numpy(), np.real(ref), rtol=1e-8, atol=1e-10)


def test_root_of_block_order():
    a = random_psd(2, 5)
    damping = torch.tensor([0.1, 0.1], dtype=torch.float64)
    order = torch.tensor([2, 3])
    out = curvkit.DampedEigen(power="1/2k").invert(a, damping=damping, order=order)
    for i, k in enumerate([2, 3]):
        m = (a[i] + 0.1 * torch.eye(5, dtype=torch.float64)).numpy()
        ref = np.real(scipy.linalg.fractional_matrix_power(m, -1.0 / (2 * k)))
        np.testing.assert_allclose(out[i].numpy(), ref, rtol=1e-8, atol=1e-10)


def test_relative_damping_scales_with_largest_eigenvalue():
    a = random_psd(1, 4)
    lam_max = torch.linalg.eigvalsh(a[0])[-1]
    out = curvkit.DampedEigen(relative_damping=True).invert(
        a, damping=torch.tensor([0.5], dtype=torch.float64), order=torch.tensor([1])
    )
    ref = torch.linalg.inv(a[0] + 0.5 * lam_max * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(out[0], ref, rtol=1e-9, atol=1e-10)


def test_cholesky_equals_explicit_inverse_and_rejects_indefinite():
    a = random_psd(3, 5, rank=2)  # rank deficient: damping makes it PD
    damping = torch.full((3,), 0.05, dtype=torch.float64)
    out = curvkit.Cholesky().invert(a, damping=damping, order=torch.tensor([2, 2, 2]))
    ref = torch.linalg.inv(a + 0.05 * torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-9)
    with pytest.raises(torch.linalg.LinAlgError):
        curvkit.Cholesky().invert(-torch.eye(3).unsqueeze(0), damping=torch.tensor([0.1]), order=torch.tensor([1]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_damped_inverse_marks_only_the_failed_factor_of_a_batch_nan(dtype):
    """A factor whose damped Cholesky factorisation fails comes back all NaN (the caller's
    per-factor retry reads that), its batch-mates exactly as inverted alone."""
    from curvkit.matrix_functions import damped_inverse

    good = random_psd(2, 70).to(dtype)
    batch = torch.stack([good[0], -torch.eye(70, dtype=dtype), good[1]])
    damping = torch.tensor([0.1, 0.1, 0.1], dtype=dtype)
    out = damped_inverse(batch, damping)
    assert torch.isnan(out[1]).all()
    for i, g in ((0, good[0]), (2, good[1])):
        assert torch.equal(out[i], damped_inverse(g.unsqueeze(0), damping[:1])[0])
        ref = torch.linalg.inv(g.double() + 0.1 * torch.eye(70, dtype=torch.float64))
        torch.testing.assert_close(out[i].double(), ref, rtol=1e-3 if dtype == torch.float32 else 1e-9, atol=1e-4 if dtype == torch.float32 else 1e-10)


def test_damped_inverse_is_row_major_and_exactly_the_column_major_result():
    """The batched Cholesky inverse comes back row-major (no copy before the products read it),
    with the bits LAPACK's column-major result has: the transpose is free because the result is
    exactly symmetric."""
    from curvkit.matrix_functions import damped_inverse

    batch = random_psd(3, 33)
    damping = torch.full((3,), 0.1, dtype=batch.dtype)
    out = damped_inverse(batch, damping)
    assert out.is_contiguous()
    damped = batch + batch.mT  # the function's own arithmetic: 2 (A + eps I), halved
    damped.diagonal(dim1=-2, dim2=-1).add_(damping[:, None], alpha=2.0)
    ref = torch.cholesky_inverse(torch.linalg.cholesky(damped.mul_(0.5)))
    assert torch.equal(out, ref.contiguous())


def test_eigen_clips_negative_eigenvalues_of_noisy_psd():
    a = torch.diag(torch.tensor([1.0, -1e-9, 0.0], dtype=torch.float64)).unsqueeze(0)
    out = curvkit.DampedEigen().invert(a, damping=torch.tensor([0.1], dtype=torch.float64), order=torch.tensor([1]))
    torch.testing.assert_close(torch.diagonal(out[0]), torch.tensor([1 / 1.1, 10.0, 10.0], dtype=torch.float64))


@pytest.mark.parametrize("bad", [0.0, -1.0, "1/2", "k", float("nan")])
def test_invalid_power_rejected(bad):
    with pytest.raises(ValueError, match="power"):
        curvkit.DampedEigen(power=bad)


def test_unknown_option_named():
    with pytest.raises(ValueError, match="powr"):
        curvkit.DampedEigen(powr=2)


def _dead_unit_factor(seed, d=128):
    """An EMA of low-rank Grams of a layer whose other units are dead: exactly zero rows and
    columns, the factors on which float32 ``eigh`` fails about one time in four."""
    g = torch.Generator().manual_seed(seed)
    active = torch.randperm(d, generator=g)[: 20 + seed % 40]
    rank = 1 + seed % 6
    a = torch.zeros(d, d)
    for _ in range(30):
        x = torch.zeros(d, 8)
        x[active] = torch.randn(len(active), rank, generator=g) @ torch.randn(rank, 8, generator=g) * 0.1
        a = 0.95 * a + 0.05 * (x @ x.T)
    return 0.5 * (a + a.T)


def _plain_eigh_fails(a):
    try:
        vals, vecs = torch.linalg.eigh(a)
    except RuntimeError:
        return True
    return not bool(torch.isfinite(vals).all() and torch.isfinite(vecs).all())


@pytest.mark.parametrize("inverter", ["root", "relative", "eigenbasis"])
def test_float32_eigen_inverters_succeed_on_factors_with_dead_units(inverter):
    """Factors on which plain float32 eigh raises or returns NaN: the eigen inverters decompose
    them shifted by the damping, in float32, and match the float64 result."""
    seeds = [s for s in range(40) if _plain_eigh_fails(_dead_unit_factor(s))][:4]
    assert len(seeds) == 4  # the case is real on this build
    a = torch.stack([_dead_unit_factor(s) for s in seeds])
    damping = torch.full((4,), 1e-3)
    order = torch.full((4,), 2)
    if inverter == "eigenbasis":
        from curvkit.inverters.eigenbasis import Eigenbasis
        inv = Eigenbasis(power="1/2k")
        vecs, values = inv.invert(a, damping=damping, order=order)
        out = (vecs * values.unsqueeze(-2)) @ vecs.transpose(-1, -2)
        ref_inv = Eigenbasis(power="1/2k")
        v64, l64 = ref_inv.invert(a.double(), damping=damping.double(), order=order)
        ref = (v64 * l64.unsqueeze(-2)) @ v64.transpose(-1, -2)
    else:
        inv = curvkit.DampedEigen(power="1/2k", relative_damping=inverter == "relative")
        out = inv.invert(a, damping=damping, order=order)
        ref = inv.invert(a.double(), damping=damping.double(), order=order)
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
