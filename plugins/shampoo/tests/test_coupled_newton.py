"""coupled_newton against scipy's fractional powers and curvkit's damped_eigen."""

import pytest
import torch
from shampoo_reference import inverse_root

import curvkit
from curvkit.testing import check_inverter
from curvkit_shampoo import CoupledNewton, lambda_max


def spd_batch(b, d, *, rank=None, condition=1e4):
    """PSD matrices with eigenvalues spread over `condition` (and zeros beyond `rank`)."""
    rank = d if rank is None else rank
    q, _ = torch.linalg.qr(torch.randn(b, d, d, dtype=torch.float64))
    vals = torch.zeros(b, d, dtype=torch.float64)
    vals[:, :rank] = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), rank, dtype=torch.float64)
    return (q * (10 * vals).unsqueeze(-2)) @ q.transpose(-1, -2)


def rel_err(a, b):
    return ((a - b).abs().amax(dim=(-2, -1)) / b.abs().amax(dim=(-2, -1))).max().item()


@pytest.mark.parametrize("power, order, root", [(1.0, 2, 1), (0.5, 3, 2), (0.25, 1, 4), ("1/2k", 3, 6), ("1/k", 2, 2)])
def test_matches_scipy_fractional_power(power, order, root):
    a = spd_batch(3, 7, rank=5, condition=1e6)
    damping = torch.tensor([1e-4, 1e-2, 1.0], dtype=torch.float64)
    out = CoupledNewton(power=power).invert(a, damping=damping, order=torch.full((3,), order))
    ref = torch.stack([inverse_root(a[i], float(damping[i]), root) for i in range(3)])
    assert rel_err(out, ref) < 1e-8


@pytest.mark.parametrize("relative", [False, True])
def test_agrees_with_damped_eigen_to_a_stated_tolerance(relative):
    """Stated tolerance: 1e-8 relative (max norm) in float64 for condition numbers up to 1e8
    after damping; with relative damping the power-method lambda_max adds up to ~1e-6."""
    a = torch.cat([spd_batch(4, 12, condition=1e6), spd_batch(2, 12, rank=3)])
    damping = torch.tensor([1e-3, 1e-2, 0.1, 1.0, 1e-3, 1e-1], dtype=torch.float64)
    order = torch.tensor([1, 2, 3, 2, 2, 3])
    newton = CoupledNewton(power="1/2k", relative_damping=relative).invert(a, damping=damping, order=order)
    eigen = curvkit.DampedEigen(power="1/2k", relative_damping=relative).invert(a, damping=damping, order=order)
    assert rel_err(newton, eigen) < (1e-6 if relative else 1e-8)


def test_float32_inputs_iterate_in_float64_by_default():
    a = spd_batch(3, 6, condition=1e3)
    damping = torch.full((3,), 1e-2, dtype=torch.float64)
    order = torch.full((3,), 2)
    # the reference sees the same float32-rounded inputs, so only the iteration's error is measured
    ref = curvkit.DampedEigen(power="1/2k").invert(a.float().double(), damping=damping.float().double(), order=order)
    out = CoupledNewton().invert(a.float(), damping=damping.float(), order=order)
    assert out.dtype == torch.float32 and rel_err(out.double(), ref) < 1e-6
    low = CoupledNewton(float64=False).invert(a.float(), damping=damping.float(), order=order)
    assert low.dtype == torch.float32 and rel_err(low.double(), ref) < 1e-3


def test_iteration_cap_and_tolerance_are_honoured():
    a = spd_batch(2, 8, condition=1e6)
    damping = torch.full((2,), 1e-4, dtype=torch.float64)
    order = torch.full((2,), 2)
    ref = curvkit.DampedEigen(power="1/2k").invert(a, damping=damping, order=order)
    capped = CoupledNewton(max_iterations=3).invert(a, damping=damping, order=order)
    loose = CoupledNewton(tolerance=1e-1).invert(a, damping=damping, order=order)
    tight = CoupledNewton(tolerance=1e-12).invert(a, damping=damping, order=order)
    assert torch.isfinite(capped).all() and rel_err(capped, ref) > 1e-2  # far from converged
    assert 1e-12 < rel_err(loose, ref) < 1e-1
    assert rel_err(tight, ref) < 1e-9


def test_lambda_max_by_power_method():
    a = spd_batch(3, 10, condition=1e3)
    a[1] = 0.0
    lam = lambda_max(a, 200)
    assert torch.allclose(lam, torch.linalg.eigvalsh(a)[:, -1], rtol=1e-8, atol=0)


@pytest.mark.parametrize("options", [{}, {"power": 0.25}, {"power": "1/k", "relative_damping": True}])
def test_conforms(options):
    check_inverter(CoupledNewton(**options))


def test_conforms_against_scipy_reference():
    ref = lambda m, eps, k: inverse_root(m, eps, 2 * k)  # noqa: E731
    check_inverter(CoupledNewton(), reference=ref, reference_rtol=1e-7)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"power": 0.3}, "1/p for a positive integer"),
        ({"power": "1/2n"}, "'1/2k'"),
        ({"power": -1.0}, "power must be"),
        ({"tolerance": 0.0}, "tolerance"),
        ({"max_iterations": 0}, "max_iterations"),
        ({"float64": 1}, "float64 must be a bool"),
    ],
)
def test_invalid_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        CoupledNewton(**options)
