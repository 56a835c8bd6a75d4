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


def _reconstruct(vectors: Tensor, values: Tensor) -> Tensor:
    r""":math:`Q \operatorname{diag}(\lambda) Q^\top` per factor of a batch."""
    return (vectors * values.unsqueeze(-2)) @ vectors.transpose(-1, -2)


def _eigenbasis_result(who: str, out: object, b: int, d: int, dtype: torch.dtype, device: torch.device,
                       kinds: Sequence[str], damping: Tensor, rtol: float, what: str) -> Tensor:
    """Check an eigenbasis inverter's ``(vectors, values)`` and return the matrices they stand for."""
    if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, Tensor) for t in out)):
        fail(who, f"an eigenbasis inverter must return a pair (vectors, values) of tensors, got "
                  f"{type(out).__name__} ({what})")
    vectors, values = out  # type: ignore[misc]
    if tuple(vectors.shape) != (b, d, d) or tuple(values.shape) != (b, d):
        fail(who, f"returned vectors {tuple(vectors.shape)} and values {tuple(values.shape)} for a batch of "
                  f"shape {(b, d, d)}: expected {(b, d, d)} and {(b, d)} ({what})")
    for t in (vectors, values):
        if t.dtype != dtype or t.device != device:
            fail(who, f"returned dtype/device {t.dtype}/{t.device}, expected {dtype}/{device} ({what})")
    eye = torch.eye(d, dtype=torch.float64, device=device)
    for i in range(b):
        label = f"{kinds[i]} {d}x{d} factor (damping {float(damping[i])}, {what})"
        assert_finite(who, f"eigenvectors for a {label}", vectors[i])
        assert_finite(who, f"values for a {label}", values[i])
        q = vectors[i].to(torch.float64)
        err = float((q.T @ q - eye).abs().max()) if d else 0.0
        if err > max(rtol, 10 * d * torch.finfo(dtype).eps):
            fail(who, f"eigenvectors for a {label} are not orthonormal: max |Q^T Q - I| = {err:.3e}")
        if bool((values[i] <= 0).any()):
            fail(who, f"values for a {label} are not all > 0 (a damped power of a PSD factor is positive)")
    return _reconstruct(vectors, values)


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

    * the result is a tensor of shape ``(b, d, d)`` with the input dtype and device; for an
      inverter whose ``produces`` is ``"eigenbasis"``, a pair ``(vectors, values)`` of shapes
      ``(b, d, d)`` and ``(b, d)`` with orthonormal vectors and positive values, whose matrix
      :math:`Q \operatorname{diag}(\lambda) Q^\top` is what the checks below compare (eigenvectors
      of repeated eigenvalues, as of the zero factor, are not unique; the matrix is);
    * it is finite on every input, zero and rank-deficient ones included;
    * the batch agrees with inverting each factor alone (relative max-norm error at most
      ``batch_rtol``: default :math:`10^{-7}` in float64, :math:`10^{-4}` otherwise);
    * two calls give identical results (needed for bit-exact resume);
    * ``matrices``, ``damping`` and ``order`` are not modified;
    * with ``symmetric=True`` each result is symmetric PSD (all damped matrix functions of a
      PSD factor are);
    * with ``reference`` given, each result matches ``reference(matrix, damping, order)`` to
      ``reference_rtol`` (default 10 x ``batch_rtol``);
    * for a warm-started eigenbasis inverter (``warm_start``), a second call with
      ``previous=`` the first call's vectors passes the same checks (started from an exact
      eigenbasis, a refresh must give the same matrix) and leaves ``previous`` unmodified.

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
    eigen = inverter.produces == "eigenbasis"
    gen = torch.Generator().manual_seed(seed)
    for d in sizes:
        matrices, kinds = _batch(d, dtype, gen)
        b = matrices.shape[0]
        damping = torch.tensor([dampings[i % len(dampings)] for i in range(b)], dtype=dtype)
        order = torch.tensor([orders[i % len(orders)] for i in range(b)])
        raw = _one_call(inverter, who, matrices, damping, order, None, d)
        if eigen:
            out = _eigenbasis_result(who, raw, b, d, dtype, matrices.device, kinds, damping, batch_rtol, "cold")
        else:
            out = _matrix_result(who, raw, b, d, dtype, matrices.device, kinds, damping)
        again = inverter.invert(matrices, damping=damping, order=order)
        same = (all(torch.equal(x, y) for x, y in zip(raw, again)) if eigen  # type: ignore[arg-type]
                else torch.equal(raw, again))  # type: ignore[arg-type]
        if not same:
            fail(who, f"two calls on the same {d}x{d} batch gave different results (not deterministic)")
        runs = [(out, None, "cold")]
        if eigen and inverter.warm_start:
            previous = raw[0].clone()  # type: ignore[index]
            warm_raw = _one_call(inverter, who, matrices, damping, order, previous, d)
            if not torch.equal(previous, raw[0]):  # type: ignore[index]
                fail(who, f"modified its input 'previous' in place (size {d})")
            warm = _eigenbasis_result(who, warm_raw, b, d, dtype, matrices.device, kinds, damping, batch_rtol,
                                      "warm-started from the exact eigenbasis")
            runs.append((warm, previous, "warm-started"))
        for out, previous, mode in runs:
            _compare(inverter, who, out, previous, mode, matrices, damping, order, kinds, d, eigen=eigen,
                     batch_rtol=batch_rtol, symmetric=symmetric, reference=reference,
                     reference_rtol=reference_rtol)


def _one_call(inverter: Inverter, who: str, matrices: Tensor, damping: Tensor, order: Tensor,
              previous: Tensor | None, d: int) -> object:
    """One ``invert`` call, failing if it modified ``matrices``, ``damping`` or ``order``."""
    saved = (matrices.clone(), damping.clone(), order.clone())
    if previous is None:
        out = inverter.invert(matrices, damping=damping, order=order)
    else:
        out = inverter.invert(matrices, damping=damping, order=order, previous=previous)  # type: ignore[call-arg]
    for name, before, now in zip(("matrices", "damping", "order"), saved, (matrices, damping, order)):
        if not torch.equal(before, now):
            fail(who, f"modified its input {name!r} in place (size {d})")
    return out


def _matrix_result(who: str, out: object, b: int, d: int, dtype: torch.dtype, device: torch.device,
                   kinds: Sequence[str], damping: Tensor) -> Tensor:
    if not isinstance(out, Tensor):
        fail(who, f"invert must return a Tensor, got {type(out).__name__}")
    assert isinstance(out, Tensor)
    if tuple(out.shape) != (b, d, d):
        fail(who, f"returned shape {tuple(out.shape)} for a batch of shape {(b, d, d)}")
    if out.dtype != dtype or out.device != device:
        fail(who, f"returned dtype/device {out.dtype}/{out.device}, expected {dtype}/{device}")
    for i in range(b):
        assert_finite(who, f"result for a {kinds[i]} {d}x{d} factor (damping {float(damping[i])})", out[i])
    return out


def _compare(inverter: Inverter, who: str, out: Tensor, previous: Tensor | None, mode: str, matrices: Tensor,
             damping: Tensor, order: Tensor, kinds: Sequence[str], d: int, *, eigen: bool, batch_rtol: float,
             symmetric: bool, reference: InverterReference | None, reference_rtol: float) -> None:
    """Batched against one-by-one, symmetry and the reference, for the matrices ``out`` stands for."""
    b = matrices.shape[0]
    for i in range(b):
        kw = {} if previous is None else {"previous": previous[i : i + 1].clone()}
        alone = inverter.invert(matrices[i : i + 1].clone(), damping=damping[i : i + 1].clone(),
                                order=order[i : i + 1].clone(), **kw)
        if eigen:
            alone = _reconstruct(*alone)
        ok, err = _close(out[i], alone[0], batch_rtol)
        if not ok:
            fail(who, f"batched and one-by-one results differ for a {kinds[i]} {d}x{d} factor ({mode}): "
                      f"relative error {err:.3e} > {batch_rtol:.1e}")
        if symmetric:
            assert_symmetric_psd(who, f"result for a {kinds[i]} {d}x{d} factor", out[i],
                                 rtol=max(batch_rtol, 1e-10))
        if reference is not None:
            expected = reference(matrices[i].clone(), float(damping[i]), int(order[i]))
            ok, err = _close(out[i], expected.to(out.dtype), reference_rtol)
            if not ok:
                fail(who, f"result for a {kinds[i]} {d}x{d} factor (damping {float(damping[i])}, "
                          f"order {int(order[i])}, {mode}) differs from the reference: relative error "
                          f"{err:.3e} > {reference_rtol:.1e}")
