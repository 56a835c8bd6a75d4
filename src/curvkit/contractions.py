r"""Mode Gram matrices and mode products as einsum contractions with cached paths.

For a tensor :math:`G \in \mathbb{R}^{d_1 \times \cdots \times d_k}` the mode-:math:`i` unfolding
:math:`G_{(i)} \in \mathbb{R}^{d_i \times \prod_{j \ne i} d_j}` gives the mode Gram matrix

.. math:: \mathrm{gram}_i(G) = G_{(i)} G_{(i)}^\top ,

and the mode product with a matrix :math:`V \in \mathbb{R}^{d_i \times d_i}` is
:math:`(G \times_i V)_{(i)} = V G_{(i)}`. Applying one matrix per mode,
:math:`G \times_1 V_1 \cdots \times_k V_k`, equals the Kronecker matrix-vector product
:math:`(V_1 \otimes \cdots \otimes V_k)\,\mathrm{vec}(G)` (row-major ``vec``).

Contraction expressions are built with :func:`opt_einsum.contract_expression` once per
(shape, mode pattern) and cached, so the path search is not repeated every step.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import opt_einsum
import torch
from torch import Tensor

__all__ = ["mode_gram", "mode_grams", "mode_products", "unfold"]

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def unfold(tensor: Tensor, mode: int) -> Tensor:
    """The mode-``mode`` unfolding ``(d_mode, prod of the other sizes)`` (a reference helper)."""
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


@lru_cache(maxsize=1024)
def _gram_expression(shape: tuple[int, ...], mode: int):
    k = len(shape)
    left = _LETTERS[:k]
    right = left[:mode] + _LETTERS[k] + left[mode + 1 :]
    eq = f"{left},{right}->{left[mode]}{_LETTERS[k]}"
    return opt_einsum.contract_expression(eq, shape, shape)


def mode_gram(tensor: Tensor, mode: int) -> Tensor:
    """:math:`G_{(i)} G_{(i)}^\\top` for ``mode`` ``i`` (contracts every other axis)."""
    shape = tuple(tensor.shape)
    if len(shape) == 1:
        return torch.outer(tensor, tensor)
    if len(shape) == 2:
        return tensor @ tensor.T if mode == 0 else tensor.T @ tensor
    return _gram_expression(shape, mode)(tensor, tensor, backend="torch")


def mode_grams(tensor: Tensor, modes: Sequence[int] | None = None) -> list[Tensor]:
    """Mode Gram matrices for several modes (all modes by default)."""
    modes = range(tensor.dim()) if modes is None else modes
    return [mode_gram(tensor, m) for m in modes]


@lru_cache(maxsize=1024)
def _product_expression(shape: tuple[int, ...], modes: tuple[int, ...]):
    k = len(shape)
    src = _LETTERS[:k]
    out = list(src)
    operands = []
    for n, m in enumerate(modes):
        new = _LETTERS[k + n]
        operands.append(f"{new}{src[m]}")
        out[m] = new
    eq = ",".join(operands + [src]) + "->" + "".join(out)
    shapes = [(shape[m], shape[m]) for m in modes] + [shape]
    return opt_einsum.contract_expression(eq, *shapes)


def mode_products(tensor: Tensor, matrices: Sequence[Tensor | None]) -> Tensor:
    """:math:`G \\times_1 V_1 \\times_2 \\cdots \\times_k V_k`, skipping modes whose matrix is None.

    ``(G \\times_i V)`` multiplies mode ``i`` from the left: ``out[.., a, ..] = sum_j V[a, j] G[.., j, ..]``.
    """
    if len(matrices) != tensor.dim():
        raise ValueError(
            f"mode_products needs one matrix (or None) per mode: tensor has {tensor.dim()} modes, "
            f"got {len(matrices)} matrices"
        )
    modes = tuple(i for i, m in enumerate(matrices) if m is not None)
    if not modes:
        return tensor
    mats = [matrices[i] for i in modes]
    shape = tuple(tensor.shape)
    if len(shape) == 2:  # plain matmuls are the fastest path for the common case
        out = tensor
        if matrices[0] is not None:
            out = matrices[0] @ out
        if matrices[1] is not None:
            out = out @ matrices[1].T
        return out
    if len(shape) == 1:
        return mats[0] @ tensor
    return _product_expression(shape, modes)(*mats, tensor, backend="torch")
