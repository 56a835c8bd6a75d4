r"""Conformance check of :class:`~curvkit.Inverter` parts."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from ..interfaces import Inverter
from ._common import assert_finite, assert_symmetric_psd, fail, random_psd

__all__ = ["check_inverter"]

#: ``reference(matrix, damping, order) -> expected`` for one ``d x d`` factor.
InverterReference = Callable[[Tensor, float, int], Tensor]


def _close(a: Tensor, b: Tensor, rtol: float) -> tuple[bool, float]:
    """Relative agreement in the max norm: ``max|a - b| <= rtol * max(max|b|, tiny)``."""
    err = float((a.to(torch.float64) - b.to(torch.float64)).abs().max()) if a.numel() else 0.0
    scale = max(float(b.abs().max()) if b.numel() else 0.0, 1e-300)
    return err <= rtol * scale, err / scale


def _batch(d: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[Tensor, list[str]]:
    mats = [
        random_psd(d, dtype=dtype, generator=gen),
        random_psd(d, rank=1, dtype=dtype, generator=gen),
        torch.zeros(d, d, dtype=dtype),
        random_psd(d, rank=max(d // 2, 1), scale=1e3, dtype=dtype, generator=gen),
        random_psd(d, scale=1e-4, dtype=dtype, generator=gen),
    ]
    kinds = ["full-rank PSD", "rank-1 PSD", "zero", "rank-deficient PSD x 1e3", "full-rank PSD x 1e-4"]
    return torch.stack(mats), kinds


def check_inverter(
    inverter: Inverter,
    *,
    sizes: Sequence[int] = (1, 3, 6),
    dtype: torch.dtype = torch.float64,
    dampings: Sequence[float] = (1e-3, 0.1, 1.0, 0.5, 1e-2),
    orders: Sequence[int] = (1, 2, 3),
    batch_rtol: float | None = None,
    symmetric: bool = True,
    reference: InverterReference | None = None,
    reference_rtol: float | None = None,
    seed: int = 0,
) -> None:
    r"""Check that an inverter honours the :class:`~curvkit.Inverter` contract.

    For every size ``d`` in ``sizes`` it inverts one batch of five ``d x d`` factors (full-rank
    PSD, rank-1 PSD, the zero matrix, a rank-deficient matrix scaled by :math:`10^3` and a
    full-rank one scaled by :math:`10^{-4}`), each with its own damping from ``dampings`` (all
    :math:`> 0`) and block order from ``orders``, and verifies:

    * the result is a tensor of shape ``(b, d, d)`` with the input dtype and device;
    * it is finite on every input, zero and rank-deficient ones included;
    * the batch agrees with inverting each factor alone (relative max-norm error at most
      ``batch_rtol``: default :math:`10^{-7}` in float64, :math:`10^{-4}` otherwise);
    * two calls give identical results (needed for bit-exact resume);
    * ``matrices``, ``damping`` and ``order`` are not modified;
    * with ``symmetric=True`` each result is symmetric PSD (all damped matrix functions of a
      PSD factor are);
    * with ``reference`` given, each result matches ``reference(matrix, damping, order)`` to
      ``reference_rtol`` (default 10 x ``batch_rtol``).

    Args:
        inverter: the part to check.
        sizes: factor sizes to try.
        dtype: floating dtype of the factors.
        dampings: per-factor damping values, cycled over the batch.
        orders: block orders ``k`` cycled over the batch (matters for roots such as ``1/2k``).
        batch_rtol: tolerance of batched against one-by-one results.
        symmetric: also require symmetric PSD results.
        reference: a dense reference of the expected result of one factor.
        reference_rtol: tolerance against ``reference``.
        seed: seed of the random factors.

    Raises:
        AssertionError: (:class:`~curvkit.testing.ConformanceError`) naming the failed property.

    Example::

        from curvkit.testing import check_inverter
        def test_my_inverter():
            check_inverter(MyInverter(tolerance=1e-10))
    """
    who = f"inverter {getattr(inverter, 'name', '') or type(inverter).__name__}"
    if not isinstance(inverter, Inverter):
        fail(who, f"must be a curvkit.Inverter, got {type(inverter).__name__}")
    if not dampings or min(dampings) <= 0:
        raise ValueError(f"dampings must be non-empty and > 0, got {dampings!r}")
    if batch_rtol is None:
        batch_rtol = 1e-7 if dtype == torch.float64 else 1e-4
    if reference_rtol is None:
        reference_rtol = 10 * batch_rtol
    gen = torch.Generator().manual_seed(seed)
    for d in sizes:
        matrices, kinds = _batch(d, dtype, gen)
        b = matrices.shape[0]
        damping = torch.tensor([dampings[i % len(dampings)] for i in range(b)], dtype=dtype)
        order = torch.tensor([orders[i % len(orders)] for i in range(b)])
        saved = (matrices.clone(), damping.clone(), order.clone())
        out = inverter.invert(matrices, damping=damping, order=order)
        for name, before, now in zip(("matrices", "damping", "order"), saved, (matrices, damping, order)):
            if not torch.equal(before, now):
                fail(who, f"modified its input {name!r} in place (size {d})")
        if not isinstance(out, Tensor):
            fail(who, f"invert must return a Tensor, got {type(out).__name__}")
        if tuple(out.shape) != (b, d, d):
            fail(who, f"returned shape {tuple(out.shape)} for a batch of shape {(b, d, d)}")
        if out.dtype != dtype or out.device != matrices.device:
            fail(who, f"returned dtype/device {out.dtype}/{out.device}, expected {dtype}/{matrices.device}")
        for i in range(b):
            assert_finite(who, f"result for a {kinds[i]} {d}x{d} factor (damping {float(damping[i])})", out[i])
        again = inverter.invert(matrices, damping=damping, order=order)
        if not torch.equal(out, again):
            fail(who, f"two calls on the same {d}x{d} batch gave different results (not deterministic)")
        for i in range(b):
            alone = inverter.invert(matrices[i : i + 1].clone(), damping=damping[i : i + 1].clone(),
                                    order=order[i : i + 1].clone())
            ok, err = _close(out[i], alone[0], batch_rtol)
            if not ok:
                fail(who, f"batched and one-by-one results differ for a {kinds[i]} {d}x{d} factor: "
                          f"relative error {err:.3e} > {batch_rtol:.1e}")
            if symmetric:
                assert_symmetric_psd(who, f"result for a {kinds[i]} {d}x{d} factor", out[i],
                                     rtol=max(batch_rtol, 1e-10))
            if reference is not None:
                expected = reference(matrices[i].clone(), float(damping[i]), int(order[i]))
                ok, err = _close(out[i], expected.to(out.dtype), reference_rtol)
                if not ok:
                    fail(who, f"result for a {kinds[i]} {d}x{d} factor (damping {float(damping[i])}, "
                              f"order {int(order[i])}) differs from the reference: relative error "
                              f"{err:.3e} > {reference_rtol:.1e}")
