r"""Mode Gram matrices and mode products as einsum contractions with cached paths.

For a tensor :math:`G \in \mathbb{R}^{d_1 \times \cdots \times d_k}` the mode-:math:`i` unfolding
:math:`G_{(i)} \in \mathbb{R}^{d_i \times \prod_{j \ne i} d_j}` gives the mode Gram matrix

.. math:: \mathrm{gram}_i(G) = G_{(i)} G_{(i)}^\top ,

and the mode product with a matrix :math:`V \in \mathbb{R}^{d_i \times d_i}` is
:math:`(G \times_i V)_{(i)} = V G_{(i)}`. Applying one matrix per mode,
:math:`G \times_1 V_1 \cdots \times_k V_k`, equals the Kronecker matrix-vector product
:math:`(V_1 \otimes \cdots \otimes V_k)\,\mathrm{vec}(G)` (row-major ``vec``).

Contraction paths are found by :func:`opt_einsum.contract_path` once per (equation, shapes) and
cached; each step then runs the cached pairwise contractions with :func:`torch.einsum`. The cached
plan is marked as a constant for :func:`torch.compile`, so the direction computation compiles into
one graph without breaks.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

import opt_einsum
import torch
from torch import Tensor

__all__ = ["SPLIT_GRAM_MIN", "add_gram_", "contract", "contraction_plan", "gram", "mode_gram", "mode_grams", "mode_products", "unfold"]

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def unfold(tensor: Tensor, mode: int) -> Tensor:
    """The mode-``mode`` unfolding ``(d_mode, prod of the other sizes)`` (a reference helper)."""
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


Plan = tuple[tuple[tuple[int, ...], str], ...]


@lru_cache(maxsize=2048)
def _cached_plan(eq: str, shapes: tuple[tuple[int, ...], ...]) -> Plan:
    _, info = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize="auto")
    return tuple((tuple(step[0]), step[2]) for step in info.contraction_list)


def contraction_plan(eq: str, shapes: tuple[tuple[int, ...], ...]) -> Plan:
    """The opt_einsum pairwise contraction plan of ``eq`` for operand ``shapes`` (cached).

    Each step is ``(positions, einsum_string)``: pop the operands at ``positions`` (opt_einsum's
    convention), contract them with ``einsum_string`` and append the result.
    """
    return _cached_plan(eq, shapes)


# What torch.compiler.assume_constant_result(contraction_plan) does, without the decorator's
# import of torch._dynamo (about 1.5 s, on every `import curvkit`, compiled or not);
# tests/test_compile_step.py checks that the decorator still sets exactly this.
contraction_plan._dynamo_marked_constant = True  # type: ignore[attr-defined]


def contract(eq: str, *operands: Tensor) -> Tensor:
    """Evaluate ``eq`` on ``operands`` along the cached opt_einsum path, with :func:`torch.einsum`."""
    plan = contraction_plan(eq, tuple(tuple(o.shape) for o in operands))
    ops = list(operands)
    for positions, sub_eq in plan:
        picked = [ops.pop(i) for i in positions]  # opt_einsum lists them in pop order
        ops.append(torch.einsum(sub_eq, *picked))
    return ops[0]


def _gram_equation(k: int, mode: int) -> str:
    left = _LETTERS[:k]
    right = left[:mode] + _LETTERS[k] + left[mode + 1 :]
    return f"{left},{right}->{left[mode]}{_LETTERS[k]}"


#: :func:`gram` and :func:`add_gram_` split a Gram in two column halves, and so skip one of its
#: four blocks, when both sides of ``x`` have at least this many entries, on a CPU.
SPLIT_GRAM_MIN = 384


def _split_point(x: Tensor) -> int | None:
    """Where :func:`add_gram_` splits the columns of the 2-d ``x`` (``None``: one ``addmm``)."""
    rows, cols = x.shape
    if rows < SPLIT_GRAM_MIN or cols < SPLIT_GRAM_MIN or not x.is_cpu:
        return None
    return cols // 2


def add_gram_(out: Tensor, x: Tensor, *, alpha: float = 1.0, beta: float = 1.0) -> Tensor:
    r""":math:`O \leftarrow \beta O + \alpha X^\top X` in place.

    ``addmm_(x.T, x)`` computes both triangles of the symmetric result. For large ``x`` on a
    CPU (both sides at least :data:`SPLIT_GRAM_MIN`) the columns are split in halves,
    :math:`X = [X_1\ X_2]`, and only three of the four blocks are multiplied:

    .. math:: X^\top X = \begin{pmatrix} X_1^\top X_1 & X_1^\top X_2 \\ (X_1^\top X_2)^\top & X_2^\top X_2 \end{pmatrix},

    the lower-left block the transpose of the upper-right: 3/4 of the multiply-adds. Measured on 2
    CPU threads: KFAC's 16 layer Grams of the MNIST autoencoder at batch 1000 took 85 instead of
    104 ms, TNT's weight-gradient Grams 63 instead of 67 ms; a product with a side under about
    400 does not gain (a 500 x 250 Gram took 1.3x as long), and GPUs keep the single call
    (untested there). The off-diagonal blocks come from one product, so they are exactly
    transposes of each other when ``out`` was symmetric (with ``beta=0`` its content is ignored,
    NaN included, and the result is bitwise what ``beta=1`` gives on a zero ``out``); any other
    ``out`` gets its own content scaled in each block.

    Args:
        out: ``(d, d)``, updated in place.
        x: ``(n, d)``; ``out`` gains :math:`\alpha X^\top X`.
        alpha: the weight of the Gram.
        beta: the weight of ``out``'s content (0: overwritten).

    Returns:
        ``out``.
    """
    h = _split_point(x)
    if h is None:
        return out.addmm_(x.T, x, beta=beta, alpha=alpha)
    x1, x2 = x[:, :h], x[:, h:]
    out[:h, :h].addmm_(x1.T, x1, beta=beta, alpha=alpha)
    out[h:, h:].addmm_(x2.T, x2, beta=beta, alpha=alpha)
    if beta == 0.0:
        upper = out[:h, h:].addmm_(x1.T, x2, beta=0.0)
        if alpha != 1.0:  # scaled after the product, as below: the same values as beta=1 on zeros
            upper.mul_(alpha)
        out[h:, :h].copy_(upper.T)
        return out
    # both off-diagonal blocks from one product, each with its own content (any ``out``;
    # exactly transposes of each other when ``out`` was symmetric)
    cross = x1.new_empty(h, x2.shape[1]).addmm_(x1.T, x2, beta=0.0)
    for block, product in ((out[:h, h:], cross), (out[h:, :h], cross.T)):
        if beta != 1.0:
            block.mul_(beta)
        block.add_(product, alpha=alpha)
    return out


def gram(x: Tensor) -> Tensor:
    r""":math:`X^\top X` of a 2-d ``x`` (``(n, d) -> (d, d)``), by :func:`add_gram_`: use
    ``gram(x.T)`` for :math:`X X^\top`."""
    if _split_point(x) is None:
        return x.T @ x
    cols = x.shape[1]
    return add_gram_(x.new_empty(cols, cols), x, beta=0.0)


def mode_gram(tensor: Tensor, mode: int) -> Tensor:
    """:math:`G_{(i)} G_{(i)}^\\top` for ``mode`` ``i`` (contracts every other axis; matrices
    through :func:`gram`)."""
    dim = tensor.dim()
    if dim == 1:
        return torch.outer(tensor, tensor)
    if dim == 2:
        return gram(tensor.T if mode == 0 else tensor)
    return contract(_gram_equation(dim, mode), tensor, tensor)


def mode_grams(tensor: Tensor, modes: Sequence[int] | None = None) -> list[Tensor]:
    """Mode Gram matrices for several modes (all modes by default)."""
    modes = range(tensor.dim()) if modes is None else modes
    return [mode_gram(tensor, m) for m in modes]


def _product_equation(k: int, modes: tuple[int, ...]) -> str:
    src = _LETTERS[:k]
    out = list(src)
    operands = []
    for n, m in enumerate(modes):
        new = _LETTERS[k + n]
        operands.append(f"{new}{src[m]}")
        out[m] = new
    return ",".join(operands + [src]) + "->" + "".join(out)


def mode_products(tensor: Tensor, matrices: Sequence[Any]) -> Tensor:
    """:math:`G \\times_1 V_1 \\times_2 \\cdots \\times_k V_k`, skipping modes whose matrix is None.

    ``(G \\times_i V)`` multiplies mode ``i`` from the left: ``out[.., a, ..] = sum_j V[a, j] G[.., j, ..]``.
    An entry may also be an :class:`~curvkit.operators.InverseOperator` (eigenbasis, limited-memory
    pairs), applied through its own ``mode_product`` after the dense modes.
    """
    dim = tensor.dim()
    if 1 <= dim <= 2 and len(matrices) == dim and all(m is None or isinstance(m, Tensor) for m in matrices):
        # the common case, vectors and matrices with dense factors: plain matmuls are the fastest
        if dim == 1:
            return tensor if matrices[0] is None else matrices[0] @ tensor
        out = tensor if matrices[0] is None else matrices[0] @ tensor
        return out if matrices[1] is None else out @ matrices[1].T
    if any(m is not None and not isinstance(m, Tensor) for m in matrices):
        dense = [m if isinstance(m, Tensor) else None for m in matrices]
        out = mode_products(tensor, dense) if len(matrices) == tensor.dim() else tensor
        if len(matrices) != tensor.dim():
            raise ValueError(
                f"mode_products needs one matrix (or None) per mode: tensor has {tensor.dim()} modes, "
                f"got {len(matrices)} matrices"
            )
        for mode, op in enumerate(matrices):
            if op is not None and not isinstance(op, Tensor):
                out = op.mode_product(out, mode)
        return out
    if len(matrices) != tensor.dim():
        raise ValueError(
            f"mode_products needs one matrix (or None) per mode: tensor has {tensor.dim()} modes, "
            f"got {len(matrices)} matrices"
        )
    modes = tuple(i for i, m in enumerate(matrices) if m is not None)
    if not modes:
        return tensor
    mats = [matrices[i] for i in modes]
    return contract(_product_equation(dim, modes), *mats, tensor)
