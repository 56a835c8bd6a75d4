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


@pytest.mark.parametrize("shape", [(9, 7), (6, 11), (3, 2)])
def test_split_gram_equals_the_full_product_and_mirrors_its_off_diagonal_block(monkeypatch, shape):
    import curvkit.contractions as contractions

    monkeypatch.setattr(contractions, "SPLIT_GRAM_MIN", 2)  # the split path on small matrices
    x = torch.randn(*shape, dtype=torch.float64)
    d, h = shape[1], shape[1] // 2
    g = contractions.gram(x)
    torch.testing.assert_close(g, x.T @ x, rtol=1e-13, atol=1e-13)
    assert torch.equal(g[h:, :h], g[:h, h:].T)  # the copied block: exactly the transpose
    torch.testing.assert_close(contractions.mode_gram(x, 0), x @ x.T, rtol=1e-13, atol=1e-13)
    # in place: beta O + alpha X^T X on a symmetric O; beta=0 ignores O's content, NaN included
    s = torch.randn(d, d, dtype=torch.float64)
    s = s + s.T
    expected = 0.9 * s + 0.25 * (x.T @ x)
    out = contractions.add_gram_(s, x, alpha=0.25, beta=0.9)
    assert out is s
    torch.testing.assert_close(s, expected, rtol=1e-13, atol=1e-13)
    junk = torch.full((d, d), float("nan"), dtype=torch.float64)
    torch.testing.assert_close(contractions.add_gram_(junk, x, beta=0.0), x.T @ x, rtol=1e-13, atol=1e-13)
    # symmetric content stays exactly symmetric off the diagonal blocks; any other content is kept
    torch.testing.assert_close(s[h:, :h], s[:h, h:].T, rtol=0, atol=0)
    skew = torch.randn(d, d, dtype=torch.float64)
    expected = 0.5 * skew + 2.0 * (x.T @ x)
    torch.testing.assert_close(contractions.add_gram_(skew, x, alpha=2.0, beta=0.5), expected, rtol=1e-13, atol=1e-13)
    # a view of a larger matrix (KFAC's A without its homogeneous row and column)
    big = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    contractions.add_gram_(big[:d, :d], x)
    torch.testing.assert_close(big[:d, :d], x.T @ x, rtol=1e-13, atol=1e-13)
    assert not big[d].any() and not big[:, d].any()


def test_gram_splits_only_large_cpu_products(monkeypatch):
    import curvkit.contractions as contractions

    calls = []
    real = torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    m = contractions.SPLIT_GRAM_MIN
    contractions.add_gram_(torch.zeros(m, m), torch.randn(m, m))
    assert len(calls) == 3
    calls.clear()
    contractions.add_gram_(torch.zeros(m, m), torch.randn(m - 1, m))  # too few rows: one call
    contractions.add_gram_(torch.zeros(m - 1, m - 1), torch.randn(m, m - 1))  # too few columns
    assert len(calls) == 2


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("alpha", [1.0, 0.37, 2.5e5])
def test_add_gram_with_beta_0_equals_beta_1_on_zeros_bitwise(monkeypatch, split, alpha):
    """An estimator may skip zero-filling its sums (KFAC's first call writes with beta=0): the
    values must be exactly those of adding to zeros, scaled ``alpha`` included."""
    import curvkit.contractions as contractions

    if split:
        monkeypatch.setattr(contractions, "SPLIT_GRAM_MIN", 2)
    torch.manual_seed(0)
    x = torch.randn(37, 30)
    onto_zeros = contractions.add_gram_(torch.zeros(30, 30), x, alpha=alpha, beta=1.0)
    fresh = contractions.add_gram_(torch.full((30, 30), float("nan")), x, alpha=alpha, beta=0.0)
    assert torch.equal(fresh, onto_zeros)
