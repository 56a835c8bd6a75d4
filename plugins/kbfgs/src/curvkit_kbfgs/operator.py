r"""K-BFGS(L)'s :math:`H_g` as an :class:`~curvkit.operators.InverseOperator`: the L-BFGS matrix of
the last pairs, applied without forming the :math:`d \times d` matrix.

With the valid pairs as rows of :math:`S, Y \in \mathbb{R}^{k \times d}` (oldest first) and
:math:`H_0 = I`, the L-BFGS matrix is the compact representation of Byrd, Nocedal & Schnabel
(1994) (see :mod:`curvkit_kbfgs.bfgs`):

.. math::
    H = I + W^\top C\, W, \qquad W = \begin{pmatrix} Z \\ Y \end{pmatrix}, \qquad
    C = \begin{pmatrix} D + Y Y^\top & -I \\ -I & 0 \end{pmatrix}, \qquad Z = R^{-1} S ,

:math:`R` the upper triangle of :math:`S Y^\top` and :math:`D` its diagonal. :class:`LBFGSOperator`
builds :math:`W` and :math:`M = D + Y Y^\top` (the one block of :math:`C` that is not fixed)
once (:math:`O(k^2 d)`) and applies :math:`H` to the ``(d, n)``
unfolding of a tensor as :math:`V + W^\top ((C W) V)`, with :math:`C W = (M Z - Y;\ -Z)` formed
once with :math:`W` (the block structure of :math:`C`: :math:`k^2 d` flops) and kept beside it
(:math:`4 k d n` flops per application in two products, against :math:`d^2 n` for a dense
:math:`H` and :math:`O(k d^2)` more to form it; a checkpoint holds :math:`W` and :math:`M` only). It equals the two-loop recursion
(:func:`~curvkit_kbfgs.bfgs.lbfgs_apply`) applied to every column; the recursion's :math:`2k`
sequential rank-one passes over the ``(d, n)`` matrix are memory-bound, so the compact form is the
one used for matrices (measured 10-20x faster on the MNIST autoencoder's shapes).

Rows not marked ``valid`` are ignored (their :math:`s, y` are zeroed and :math:`R`'s diagonal set to
1 there, which makes their rows of :math:`Z` zero): the memory keeps a fixed shape, so adding or
dropping a pair needs no host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvkit.operators import InverseOperator

__all__ = ["LBFGSOperator"]


class LBFGSOperator(InverseOperator):
    """The L-BFGS matrix of the pairs ``s_rows, y_rows`` (``(m, d)``, oldest first, the rows with
    ``valid`` set), :math:`H_0 = I`, as a symmetric ``(d, d)`` operator (module docstring)."""

    def __init__(self, s_rows: Tensor, y_rows: Tensor, valid: Tensor | None = None, *, rows_zeroed: bool = False) -> None:
        if s_rows.dim() != 2 or s_rows.shape != y_rows.shape:
            raise ValueError(
                f"s_rows and y_rows must be (m, d) matrices of one shape, got {tuple(s_rows.shape)} and "
                f"{tuple(y_rows.shape)}"
            )
        k, d = s_rows.shape
        if valid is None:
            valid = torch.ones(k, dtype=torch.bool, device=s_rows.device)
        if valid.shape != (k,):
            raise ValueError(f"valid must have shape ({k},), got {tuple(valid.shape)}")
        self._d = int(d)
        self.dtype = s_rows.dtype
        self._q: Tensor | None = None
        if k == 0:
            self._w, self._c = None, None
            return
        if rows_zeroed:  # the caller's memory holds zeros in the rows not marked valid
            s, y = s_rows, y_rows
        else:
            mask = valid[:, None]
            s = torch.where(mask, s_rows, 0.0)
            y = torch.where(mask, y_rows, 0.0)
        sy = s @ y.T
        r = torch.triu(sy)
        r.diagonal().add_((~valid).to(s.dtype))
        z = torch.linalg.solve_triangular(r, s, upper=True)
        middle = torch.mm(y, y.T)
        middle.diagonal().add_(sy.diagonal())
        self._w = torch.cat([z, y])  # (2k, d)
        # M = D + Y Y^T, the one block of C = [[M, -I], [-I, 0]] that is not fixed (saved
        # operators of earlier versions hold the whole (2k, 2k) C: matmul reads its top-left block)
        self._c = middle
        self._cw(self.dtype)  # C W, kept beside W: two products per application

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_q"] = None  # C W is rebuilt on first use: a checkpoint holds W and M only
        return state

    def _cw(self, dtype: torch.dtype) -> Tensor:
        r""":math:`C W = (M Z - Y;\ -Z)` in ``dtype``, so that :math:`H V = V + W^\top ((C W) V)`;
        formed from ``W`` and ``M`` when missing (at construction, or in a loaded operator)."""
        q = getattr(self, "_q", None)  # operators saved before C W was kept have no _q
        if q is None:
            w = self._w
            k = w.shape[0] // 2  # type: ignore[union-attr]
            middle = self._c[:k, :k]  # type: ignore[index]
            z, y = w[:k], w[k:]  # type: ignore[index]
            q = self._q = torch.cat([torch.addmm(y, middle.to(w.dtype), z, alpha=1.0, beta=-1.0), z.neg()])
        return q if q.dtype == dtype else q.to(dtype)

    @property
    def size(self) -> int:
        return self._d

    @property
    def shape(self) -> tuple[int, int]:
        """``(d, d)``, the shape of the matrix it stands for."""
        return (self._d, self._d)

    def matmul(self, matrix: Tensor) -> Tensor:
        r"""``H @ matrix`` for ``matrix`` of shape ``(d, n)`` or ``(d,)``: :math:`V + W^\top ((C W) V)`."""
        if self._w is None:
            return matrix.clone()
        w = self._w if self._w.dtype == matrix.dtype else self._w.to(matrix.dtype)
        cw = self._cw(matrix.dtype)
        if matrix.dim() == 1:
            return torch.addmv(matrix, w.T, cw @ matrix)
        return torch.addmm(matrix, w.T, cw @ matrix)

    def to(self, dtype: torch.dtype) -> "LBFGSOperator":
        """The operator with its data in ``dtype`` (itself when it already is)."""
        if dtype == self.dtype or self._w is None:
            return self
        out = object.__new__(LBFGSOperator)
        out._d, out.dtype = self._d, dtype
        out._w, out._c = self._w.to(dtype), self._c.to(dtype)
        out._q = None if self._q is None else self._q.to(dtype)
        return out


# The optimizer's state_dict holds the current inverses, this operator among them; allow it in
# ``torch.load(weights_only=True)`` (it holds only tensors, an int and a dtype).
torch.serialization.add_safe_globals([LBFGSOperator])
