r"""Matrix functions of symmetric positive semi-definite factors, gathered in one place.

All functions act on batches ``(..., d, d)`` and never modify their inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: The integer type of each floating type's bits (same element size).
_BITS: dict[torch.dtype, torch.dtype] = {
    torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16, torch.bfloat16: torch.int16,
}

__all__ = ["damped_cholesky_inverse", "damped_eigen_power", "damped_inverse", "shifted_eigh", "symmetrize"]


def symmetrize(matrix: Tensor) -> Tensor:
    r""":math:`(A + A^\top) / 2`: removes the asymmetry that rounding leaves in accumulated Grams."""
    return 0.5 * (matrix + matrix.transpose(-1, -2))


def shifted_eigh(matrix: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    r"""``eigh`` of the symmetrised :math:`A` (eigenvalues ascending, eigenvectors), computed in
    float32 as the decomposition of :math:`A + s I` with :math:`s` subtracted from its eigenvalues.

    A curvature factor with dead units (exactly zero rows and columns) and low rank holds a large
    cluster of exactly zero eigenvalues, on which float32 ``eigh`` (LAPACK's divide and conquer,
    this build's CPU library) fails: it raises, or returns NaN. Measured on EMAs of low-rank Grams
    with 20-60 live units: 78 of 300 factors of size 128 and 100 of 100 of size 256 failed, none
    of size 32 or 64, none in float64; shifted by anything from 1e-14 to 1 every one succeeded.
    So a float32 (or narrower) factor is decomposed shifted by :math:`s` -- the damping it gets
    anyway, which leaves the eigenvectors as they are and moves the eigenvalues by :math:`s` up to
    rounding; a float64 factor is decomposed as it is.

    Args:
        matrix: ``(..., d, d)`` symmetric matrices.
        shift: ``(...)`` the shift :math:`s` per matrix (broadcastable, >= 0).
    """
    sym = symmetrize(matrix)
    if sym.dtype == torch.float64:
        return torch.linalg.eigh(sym)
    shift = torch.as_tensor(shift, dtype=sym.dtype, device=sym.device).unsqueeze(-1)
    sym.diagonal(dim1=-2, dim2=-1).add_(shift)
    vals, vecs = torch.linalg.eigh(sym)
    return vals - shift, vecs


def damped_eigen_power(
    matrix: Tensor, damping: Tensor, power: Tensor, *, relative: bool = False
) -> Tensor:
    r"""The matrix power :math:`(A + \epsilon I)^{-p}` through one symmetric eigendecomposition.

    With :math:`A = Q \Lambda Q^\top`, returns :math:`Q\,(\max(\Lambda, 0) + \epsilon)^{-p} Q^\top`.
    Negative eigenvalues (rounding noise of a PSD matrix) are clipped to zero before damping.
    In float32 the decomposition is of :math:`A` shifted by the damping (:func:`shifted_eigh`;
    with relative damping by :math:`\epsilon \max_i A_{ii}`, at most :math:`\epsilon \lambda_{\max}`).

    Args:
        matrix: ``(..., d, d)`` symmetric PSD matrices.
        damping: ``(...)`` damping :math:`\epsilon` per matrix (broadcastable).
        power: ``(...)`` exponent :math:`p` per matrix (broadcastable).
        relative: use :math:`\epsilon \lambda_{\max}` instead of :math:`\epsilon` (production
            Shampoo's epsilon relative to the largest eigenvalue; a zero matrix then falls back to
            absolute damping so the result stays finite).
    """
    damping = torch.as_tensor(damping, dtype=matrix.dtype, device=matrix.device)
    # the shift: the damping, or with relative damping eps * max_i A_ii (at most eps * lambda_max)
    shift = damping * matrix.diagonal(dim1=-2, dim2=-1).amax(dim=-1).clamp_min(0) if relative else damping
    eigvals, eigvecs = shifted_eigh(matrix, shift)
    eigvals = eigvals.clamp_min(0)
    if relative:
        lam_max = eigvals[..., -1]
        damping = torch.where(lam_max > 0, damping * lam_max, damping)
    power = torch.as_tensor(power, dtype=eigvals.dtype, device=eigvals.device)
    scaled = (eigvals + damping.unsqueeze(-1)).pow(-power.unsqueeze(-1))
    return (eigvecs * scaled.unsqueeze(-2)) @ eigvecs.transpose(-1, -2)


def damped_cholesky_inverse(matrix: Tensor, damping: Tensor) -> Tensor:
    r""":math:`(A + \epsilon I)^{-1}` through a Cholesky factorisation.

    Raises:
        torch.linalg.LinAlgError: if a damped matrix is not positive definite.
    """
    d = matrix.shape[-1]
    eye = torch.eye(d, dtype=matrix.dtype, device=matrix.device)
    damping = torch.as_tensor(damping, dtype=matrix.dtype, device=matrix.device)
    damped = symmetrize(matrix) + damping[..., None, None] * eye
    chol, info = torch.linalg.cholesky_ex(damped)
    if bool((info != 0).any()):
        raise torch.linalg.LinAlgError(
            "Cholesky factorisation failed: a damped factor is not positive definite"
        )
    return torch.cholesky_inverse(chol)


def damped_inverse(matrix: Tensor, damping: Tensor) -> Tensor:
    r""":math:`(A + \epsilon I)^{-1}` of PSD matrices through a batched Cholesky factorisation.

    The exact inverse that ``damped_eigen`` computes for power 1, at a fraction of the cost of an
    eigendecomposition (:math:`d^3/3` flops for the factorisation against roughly :math:`9 d^3`
    for ``eigh``) and without its convergence failures on rank-deficient factors (one example,
    dead units, 1-D bias blocks): :math:`A + \epsilon I` is well conditioned whenever
    :math:`\epsilon` is not negligible against :math:`\|A\|`. A matrix whose factorisation
    fails (not positive definite after damping) gets a NaN result, so the caller's per-factor
    retry handles it; no host synchronisation happens here.

    Args:
        matrix: ``(..., d, d)`` symmetric PSD matrices.
        damping: ``(...)`` damping per matrix (broadcastable).
    """
    damping = torch.as_tensor(damping, dtype=matrix.dtype, device=matrix.device)
    damped = matrix + matrix.transpose(-1, -2)  # 2 (A + eps I), symmetrised; halved below
    damped.diagonal(dim1=-2, dim2=-1).add_(damping[..., None], alpha=2.0)
    chol, info = torch.linalg.cholesky_ex(damped.mul_(0.5))
    out = torch.cholesky_inverse(chol)
    if out.mT.is_contiguous():  # LAPACK's column-major result: its transpose is the row-major
        out = out.mT  # matrix without a copy (the CPU's potri result is exactly symmetric)
    bits = _BITS.get(out.dtype)
    if bits is None or torch.compiler.is_compiling():
        return out.masked_fill_((info != 0)[..., None, None], float("nan"))
    # NaN where the factorisation failed, as an in-place OR of the bits with all ones (a NaN) or
    # zeros (the same bits): masked_fill_ with a (b, 1, 1) mask tests the mask at every entry
    out.view(bits).bitwise_or_((info != 0).to(bits).neg_()[..., None, None])
    return out
