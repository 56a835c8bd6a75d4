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
