"""The sampler: targets follow the predictive distribution; gradients of the batch-mean loss."""

import pytest
import torch
import torch.nn.functional as F

from curvkit.fisher import sample_targets, sampled_loss

DRAWS = 40000


def test_categorical_frequencies_follow_softmax():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]]).expand(DRAWS, 4)
    gen = torch.Generator().manual_seed(0)
    y = sample_targets(logits, "cross_entropy", generator=gen)
    freq = torch.bincount(y, minlength=4).double() / DRAWS
    probs = torch.softmax(logits[0].double(), 0)
    # 5 standard errors of a binomial proportion
    tol = 5 * torch.sqrt(probs * (1 - probs) / DRAWS)
    assert torch.all((freq - probs).abs() < tol), (freq, probs)


def test_categorical_with_spatial_dims():
    logits = torch.randn(3, 5, 2, 2)
    y = sample_targets(logits, "cross_entropy")
    assert y.shape == (3, 2, 2) and y.dtype == torch.long and int(y.max()) < 5


def test_bernoulli_frequencies_follow_sigmoid():
    z = torch.tensor([-2.0, 0.0, 1.5]).expand(DRAWS, 3)
    y = sample_targets(z, "bce_with_logits", generator=torch.Generator().manual_seed(1))
    p = torch.sigmoid(z[0].double())
    tol = 5 * torch.sqrt(p * (1 - p) / DRAWS)
    assert torch.all((y.double().mean(0) - p).abs() < tol)


def test_gaussian_targets_have_unit_variance_around_outputs():
    z = torch.tensor([0.3, -2.0]).expand(DRAWS, 2)
    y = sample_targets(z, "mse", generator=torch.Generator().manual_seed(2))
    r = (y - z).double()
    assert torch.all(r.mean(0).abs() < 5 / DRAWS**0.5)
    assert torch.all((r.var(0) - 1).abs() < 5 * (2 / DRAWS) ** 0.5)


@pytest.mark.parametrize("loss", ["cross_entropy", "bce_with_logits", "mse"])
def test_sampled_loss_is_batch_mean_of_per_example_losses(loss):
    n, c = 6, 4
    w = torch.randn(c, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(n, 3, dtype=torch.float64)
    z = x @ w.T
    state = torch.Generator().manual_seed(3).get_state()
    gen = torch.Generator()
    gen.set_state(state)
    value = sampled_loss(z, loss, generator=gen)
    (grad,) = torch.autograd.grad(value, w)
    gen.set_state(state)
    y = sample_targets(z, loss, generator=gen)
    # per-example loop, summed over outputs (bce/mse) as in the paper, then averaged over the batch
    total = torch.zeros_like(w)
    for i in range(n):
        zi = x[i] @ w.T
        if loss == "cross_entropy":
            li = -torch.log_softmax(zi, 0)[y[i]]
        elif loss == "bce_with_logits":
            li = F.binary_cross_entropy_with_logits(zi, y[i], reduction="sum")
        else:
            li = 0.5 * ((zi - y[i]) ** 2).sum()
        total += torch.autograd.grad(li, w)[0]
    torch.testing.assert_close(grad, total / n, rtol=1e-10, atol=1e-12)


def test_callable_loss_and_errors():
    z = torch.randn(4, 3, requires_grad=True)
    assert sampled_loss(z, lambda out, gen: out.sum()).shape == ()
    with pytest.raises(ValueError, match="scalar"):
        sampled_loss(z, lambda out, gen: out)
    with pytest.raises(ValueError, match="loss must be one of"):
        sampled_loss(z, "hinge")
    with pytest.raises(ValueError, match="reduction"):
        sampled_loss(z, "mse", reduction="avg")


_CLOSED_FORM_CASES = [
    ("cross_entropy", (6, 4), {}),
    ("cross_entropy", (3, 5, 4), {"class_dim": -1}),
    ("cross_entropy", (3, 5, 4), {"class_dim": 1, "reduction": "sum"}),
    ("cross_entropy", (2, 4, 3, 2), {"reduction": "mean"}),
    ("bce_with_logits", (6, 5), {}),
    ("bce_with_logits", (6, 5), {"reduction": "mean"}),
    ("mse", (6, 3), {}),
    ("mse", (6, 3), {"reduction": "sum"}),
]


@pytest.mark.parametrize("loss,shape,options", _CLOSED_FORM_CASES, ids=lambda v: str(v))
def test_closed_form_output_gradient_equals_the_sampled_loss_gradient(loss, shape, options):
    from curvkit.fisher import sampled_output_gradient

    z = (3 * torch.randn(*shape, dtype=torch.float64)).requires_grad_()
    value = sampled_loss(z, loss, generator=torch.Generator().manual_seed(7), **options)
    (reference,) = torch.autograd.grad(value, z)
    seed = sampled_output_gradient(z, loss, generator=torch.Generator().manual_seed(7), **options)
    assert seed.dtype == z.dtype and seed.shape == z.shape and seed.grad_fn is None
    torch.testing.assert_close(seed, reference, rtol=1e-12, atol=1e-15)


def test_closed_form_output_gradient_keeps_non_finite_outputs_non_finite_and_checks_its_input():
    from curvkit.fisher import sampled_output_gradient

    z = torch.randn(4, 3)
    z[1, 2] = float("nan")
    for loss in ("cross_entropy", "bce_with_logits", "mse"):
        seed = sampled_output_gradient(z, loss, generator=torch.Generator().manual_seed(0))
        assert not torch.isfinite(seed[1]).all() and torch.isfinite(seed[[0, 2, 3]]).all(), loss
    assert sampled_output_gradient(z, lambda out, gen: out.sum()) is None  # a sampler defines its own loss
    with pytest.raises(ValueError, match="reduction must be one of"):
        sampled_output_gradient(z, "mse", reduction="avg")
    with pytest.raises(ValueError, match="class_dim"):
        sampled_output_gradient(z, "mse", class_dim=-1)
    with pytest.raises(ValueError, match="batch dimension"):
        sampled_output_gradient(torch.tensor(1.0), "mse")
