r"""Quasi-Newton building blocks of K-BFGS: the BFGS inverse update, double damping, L-BFGS.

All functions are pure (no state, no host synchronisation) and work in the dtype of their inputs.

**BFGS inverse update.** Given an SPD approximation :math:`H` of an inverse Hessian and a pair
:math:`(s, y)` with :math:`s^\top y > 0`, :math:`\rho = 1 / s^\top y`,

.. math::
    H_+ = (I - \rho s y^\top) H (I - \rho y s^\top) + \rho s s^\top
        = H - \rho (s\, (Hy)^\top + Hy\, s^\top) + (\rho^2\, y^\top H y + \rho)\, s s^\top ,

which is SPD and satisfies the secant equation :math:`H_+ y = s` (:func:`bfgs_inverse_update`,
:math:`O(d^2)`).

**Double damping** (Goldfarb, Ren & Bahamou, 2020), :func:`double_damping`: first Powell's damping
written for the inverse :math:`H`: if :math:`s^\top y < \mu_1\, y^\top H y`,

.. math::
    \theta_1 = \frac{(1 - \mu_1)\, y^\top H y}{y^\top H y - s^\top y}, \qquad
    \tilde s = \theta_1 s + (1 - \theta_1) H y ,

so that :math:`\tilde s^\top y \ge \mu_1\, y^\top H y` (with equality when it acts); then a
Levenberg-Marquardt step that keeps :math:`H_+` bounded above, in one of two forms:

* ``"interpolate"`` (what the authors' code runs; Powell's damping again, with :math:`B = I`): if
  :math:`\tilde s^\top y < \mu_2\, \tilde s^\top \tilde s`,
  :math:`\theta_2 = (1 - \mu_2)\, \tilde s^\top \tilde s / (\tilde s^\top \tilde s - \tilde s^\top y)`
  and :math:`\tilde y = \theta_2 y + (1 - \theta_2) \tilde s`, so that
  :math:`\tilde s^\top \tilde y \ge \mu_2\, \tilde s^\top \tilde s`;
* ``"add"`` (the textbook Levenberg-Marquardt form): :math:`\tilde y = y + \mu_2 \tilde s`, so that
  :math:`\tilde s^\top \tilde y = \tilde s^\top y + \mu_2\, \tilde s^\top \tilde s
  \ge \mu_1\, y^\top H y + \mu_2\, \tilde s^\top \tilde s`.

**L-BFGS.** With the last :math:`k` pairs as rows of :math:`S, Y \in \mathbb{R}^{k \times d}` and
:math:`H_0 = I`, the limited-memory matrix is the dense BFGS matrix obtained by applying the
inverse update to :math:`I` with those pairs in order. :func:`lbfgs_apply` applies it to vectors
by the two-loop recursion (:math:`O(kd)` per vector); :func:`lbfgs_matrix` materialises it with
the compact representation of Byrd, Nocedal & Schnabel (1994): with :math:`R` the upper triangle
of :math:`S Y^\top` (:math:`R_{ij} = s_i^\top y_j, i \le j`), :math:`D = \mathrm{diag}(S Y^\top)`
and :math:`Z = R^{-1} S`,

.. math:: H = I + Z^\top (D + Y Y^\top) Z - Z^\top Y - Y^\top Z \qquad (O(k d^2)).
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvkit.engine.finite import select, zero_unless_

__all__ = [
    "LM_FORMS",
    "accept_pair",
    "bfgs_inverse_update",
    "bfgs_inverse_update_where",
    "double_damping",
    "lbfgs_apply",
    "lbfgs_matrix",
    "lbfgs_push",
    "restart_",
    "restart_where",
]

#: The forms of the Levenberg-Marquardt part of :func:`double_damping`.
LM_FORMS = ("interpolate", "add")


def bfgs_inverse_update(h: Tensor, s: Tensor, y: Tensor) -> Tensor:
    r"""The BFGS update :math:`H_+` of the inverse approximation ``h`` with the pair ``(s, y)``.

    The caller guarantees :math:`s^\top y > 0` (see :func:`accept_pair`). The result is exactly
    symmetric when ``h`` is.
    """
    rho = 1.0 / torch.dot(s, y)
    hy = h @ y
    coef = rho * rho * torch.dot(y, hy) + rho
    return h + coef * torch.outer(s, s) - rho * _symmetric_cross(s, hy)


def bfgs_inverse_update_where(h: Tensor, s: Tensor, y: Tensor, accept: Tensor) -> Tensor:
    r""":func:`bfgs_inverse_update` where ``accept`` (a 0-d bool tensor) holds, ``h`` itself
    otherwise, decided on the device without a ``d x d`` select.

    The rejected case is masked on the vectors and scalars instead: with :math:`u = \sqrt{c}\,s`
    (:math:`c = \rho^2 y^\top H y + \rho`) and :math:`v = \rho s`, the update is
    :math:`H + u u^\top - (v (Hy)^\top + (Hy) v^\top)`, and zeroing :math:`u, v, Hy` when the
    pair is rejected (or not finite) adds exact zeros. Four passes over :math:`H` instead of eight
    (the outer products, their sum and the select); exactly symmetric when ``h`` is.
    """
    rho = 1.0 / torch.dot(s, y)
    hy = h @ y
    coef = rho * rho * torch.dot(y, hy) + rho
    u = torch.where(accept, coef.clamp_min(0).sqrt() * s, 0.0)
    v = torch.where(accept, rho * s, 0.0)
    hy = torch.where(accept, hy, 0.0)
    return torch.addr(h, u, u).sub_(_symmetric_cross(v, hy))


def _symmetric_cross(a: Tensor, b: Tensor) -> Tensor:
    r""":math:`a b^\top + b a^\top`, exactly symmetric: entry :math:`(i, j)` is
    :math:`\mathrm{fl}(a_i b_j) + \mathrm{fl}(b_i a_j)` and entry :math:`(j, i)` the same two
    rounded products added the other way round (the same bits as ``c + c.T`` for
    ``c = outer(a, b)``, without its transposed read: 0.5 against 2.1 ms at d = 1001 out of cache)."""
    return torch.outer(a, b).add_(torch.outer(b, a))


def restart_where(h: Tensor, reset: Tensor, diagonal: float) -> Tensor:
    """``diagonal * I`` where ``reset`` (a 0-d bool tensor) holds, ``h`` otherwise (one pass)."""
    return _restart_diagonal(select(~reset, h, 0.0), reset, diagonal)


def restart_(h: Tensor, reset: Tensor, diagonal: float) -> Tensor:
    """:func:`restart_where` in place on ``h`` (a fresh result the caller owns): no copy of a
    matrix that is almost never restarted."""
    return _restart_diagonal(zero_unless_(~reset, h), reset, diagonal)


def _restart_diagonal(zeroed: Tensor, reset: Tensor, diagonal: float) -> Tensor:
    zeroed.diagonal().add_(reset.to(zeroed.dtype) * diagonal)
    return zeroed


def double_damping(
    s: Tensor, y: Tensor, hy: Tensor, *, mu1: float, mu2: float, form: str = "interpolate"
) -> tuple[Tensor, Tensor]:
    r"""Powell's damping on :math:`H` followed by Levenberg-Marquardt damping (module docstring).

    Args:
        s, y: the pair, shape ``(d,)``.
        hy: :math:`H y` with the current inverse approximation :math:`H`.
        mu1: Powell's constant :math:`\mu_1` (0.2 in the paper).
        mu2: the Levenberg-Marquardt constant :math:`\mu_2` (:math:`\sqrt\lambda`).
        form: ``"interpolate"`` or ``"add"``.

    Returns:
        The damped pair :math:`(\tilde s, \tilde y)`.
    """
    if form not in LM_FORMS:
        raise ValueError(f"form must be one of {LM_FORMS}, got {form!r}")
    sy, yhy = torch.dot(s, y), torch.dot(y, hy)
    powell = sy < mu1 * yhy
    gap = torch.where(powell, yhy - sy, 1.0)
    theta1 = torch.where(powell, (1.0 - mu1) * yhy / gap, 1.0)
    s_t = torch.lerp(hy, s, theta1)  # theta1 s + (1 - theta1) H y
    if form == "add":
        return s_t, y + mu2 * s_t
    sty, sts = torch.dot(s_t, y), torch.dot(s_t, s_t)
    lm = sty < mu2 * sts
    gap2 = torch.where(lm, sts - sty, 1.0)
    theta2 = torch.where(lm, (1.0 - mu2) * sts / gap2, 1.0)
    return s_t, torch.lerp(s_t, y, theta2)  # theta2 y + (1 - theta2) s_t


def accept_pair(s: Tensor, y: Tensor, reference: Tensor, *, tol: float) -> Tensor:
    r"""Whether a (damped) pair may update :math:`H`, as a 0-d bool tensor (no host sync).

    Accepted when everything is finite and
    :math:`s^\top y > \max(0,\ \mathrm{tol}\cdot s^\top s\,\lVert r\rVert)` with ``reference``
    :math:`r` (the mean output gradient for the pre-activation side, the mean input for the
    activation side), the skip rule of the authors' code. Finiteness is read from the products
    the rule needs anyway (a product that overflows from finite entries counts as not finite).
    """
    sy, ss = torch.dot(s, y), torch.dot(s, s)
    scale = torch.linalg.vector_norm(reference)
    # a NaN or infinity in s, y or the reference shows in s^T y + s^T s + ||r|| (0 * inf is NaN)
    finite = torch.isfinite(sy + ss + scale)
    return finite & (sy > 0) & (sy > tol * ss * scale)


def lbfgs_apply(s_rows: Tensor, y_rows: Tensor, v: Tensor) -> Tensor:
    r"""The L-BFGS matrix (pairs ``s_rows``, ``y_rows`` of shape ``(k, d)``, oldest first,
    :math:`H_0 = I`) times ``v`` of shape ``(d,)`` or ``(d, n)``, by the two-loop recursion."""
    k = s_rows.shape[0]
    if k == 0:
        return v.clone()
    vector = v.dim() == 1
    q = v.unsqueeze(1) if vector else v.clone()
    rho = 1.0 / (s_rows * y_rows).sum(dim=1)
    alphas: list[Tensor] = []
    for i in range(k - 1, -1, -1):  # newest to oldest
        alpha = rho[i] * (s_rows[i] @ q)
        alphas.append(alpha)
        q = q - torch.outer(y_rows[i], alpha)
    r = q
    for i in range(k):  # oldest to newest
        beta = rho[i] * (y_rows[i] @ r)
        r = r + torch.outer(s_rows[i], alphas[k - 1 - i] - beta)
    return r.squeeze(1) if vector else r


def lbfgs_matrix(s_rows: Tensor, y_rows: Tensor) -> Tensor:
    r"""The L-BFGS matrix of the pairs (``(k, d)`` each, oldest first, :math:`H_0 = I`) as a dense
    ``(d, d)`` tensor, by the compact representation (module docstring)."""
    k, d = s_rows.shape
    eye = torch.eye(d, dtype=s_rows.dtype, device=s_rows.device)
    if k == 0:
        return eye
    sy = s_rows @ y_rows.T
    r = torch.triu(sy)
    z = torch.linalg.solve_triangular(r, s_rows, upper=True)
    middle = torch.diag(torch.diagonal(sy)) + y_rows @ y_rows.T
    zy = z.T @ y_rows
    h = eye + z.T @ middle @ z - zy - zy.T
    return 0.5 * (h + h.T)


def lbfgs_push(
    s_rows: Tensor, y_rows: Tensor, valid: Tensor, s: Tensor, y: Tensor, accept: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Append the pair ``(s, y)`` to a fixed-size pair memory when ``accept`` (a 0-d bool tensor)
    holds, dropping the oldest pair; otherwise return the memory unchanged. No host sync.

    The memory is ``s_rows, y_rows`` of shape ``(m, d)``, oldest first, with ``valid`` ``(m,)``
    marking the rows that hold pairs (always a suffix: pairs enter at the end).
    """
    s_new = torch.cat([s_rows[1:], s[None]])
    y_new = torch.cat([y_rows[1:], y[None]])
    v_new = torch.cat([valid[1:], valid.new_ones(1)])
    return (
        select(accept, s_new, s_rows),
        select(accept, y_new, y_rows),
        torch.where(accept, v_new, valid),
    )
