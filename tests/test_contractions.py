"""Mode Grams and mode products against explicit unfoldings and dense Kronecker products."""

import functools

import pytest
import torch

from curvkit.contractions import mode_gram, mode_products

SHAPES = [(5,), (4, 3), (3, 4, 2), (2, 3, 2, 3)]


def explicit_unfold(t: torch.Tensor, mode: int) -> torch.Tensor:
    # the textbook unfolding, built by index loops (independent of movedim/reshape tricks)
    rest = [d for i, d in enumerate(t.shape) if i != mode]
    cols = 1
    for d in rest:
        cols *= d
    out = torch.empty(t.shape[mode], cols, dtype=t.dtype)
    for idx in torch.cartesian_prod(*[torch.arange(d) for d in t.shape]).reshape(-1, t.dim()).tolist():
        col = 0
        for i, d in enumerate(t.shape):
            if i != mode:
                col = col * d + idx[i]
        out[idx[mode], col] = t[tuple(idx)]
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_mode_gram_equals_unfolding_product(shape):
    g = torch.randn(shape, dtype=torch.float64)
    for mode in range(len(shape)):
        u = explicit_unfold(g, mode)
        torch.testing.assert_close(mode_gram(g, mode), u @ u.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_mode_products_equal_dense_kronecker_matvec(shape):
    g = torch.randn(shape, dtype=torch.float64)
    mats = [torch.randn(d, d, dtype=torch.float64) for d in shape]
    dense = functools.reduce(torch.kron, mats)
    expected = (dense @ g.reshape(-1)).reshape(shape)
    torch.testing.assert_close(mode_products(g, mats), expected, rtol=1e-10, atol=1e-10)


def test_mode_products_skip_identity_modes():
    g = torch.randn(3, 4, 5, dtype=torch.float64)
    mats = [torch.randn(3, 3, dtype=torch.float64), None, torch.randn(5, 5, dtype=torch.float64)]
    dense = functools.reduce(torch.kron, [mats[0], torch.eye(4, dtype=torch.float64), mats[2]])
    expected = (dense @ g.reshape(-1)).reshape(g.shape)
    torch.testing.assert_close(mode_products(g, mats), expected, rtol=1e-10, atol=1e-10)


def test_mode_products_wrong_count_raises():
    with pytest.raises(ValueError, match="one matrix"):
        mode_products(torch.randn(3, 4), [torch.eye(3)])
