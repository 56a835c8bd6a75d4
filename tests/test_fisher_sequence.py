"""Sequence outputs and loss objects in the sampler (curvkit.fisher).

* ``(batch, time, vocab)`` logits: targets are drawn along the axis the caller names
  (``class_dim``), checked by per-class frequencies against the softmax along that axis; a rank-3
  input without ``class_dim`` is refused (it was sampled along the time axis, silently).
* PyTorch's loss functions and modules stand for the named likelihoods; unknown callables and
  training losses ``(outputs, target)`` get a ValueError that says what a sampler looks like.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvkit
from curvkit.fisher import resolve_loss, sample_targets, sampled_loss

DRAWS = 20000


def _five_sigma(freq: torch.Tensor, probs: torch.Tensor, n: int) -> torch.Tensor:
    return (freq - probs).abs() < 5 * torch.sqrt(probs * (1 - probs) / n) + 1e-12


def test_btv_logits_sample_along_the_vocabulary_axis():
    """Two positions with different distributions over V = 5 classes; T = 2 < V so that sampling
    along the wrong axis (time) could not even produce the classes 2..4."""
    probs = torch.tensor([[0.05, 0.1, 0.2, 0.25, 0.4], [0.5, 0.3, 0.1, 0.05, 0.05]], dtype=torch.float64)
    logits = probs.log().float()[None].expand(DRAWS, 2, 5)  # (B, T, V)
    y = sample_targets(logits, "cross_entropy", class_dim=-1, generator=torch.Generator().manual_seed(0))
    assert y.shape == (DRAWS, 2) and y.dtype == torch.long
    for t in range(2):
        freq = torch.bincount(y[:, t], minlength=5).double() / DRAWS
        assert torch.all(_five_sigma(freq, probs[t], DRAWS)), (t, freq, probs[t])
    # class_dim=2 is the same axis as -1
    y2 = sample_targets(logits, "cross_entropy", class_dim=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, y2)


def test_class_dim_one_keeps_pytorchs_layout_for_rank_three():
    probs = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)
    logits = probs.log().float()[None, :, None].expand(DRAWS, 3, 2)  # (N, C, L)
    y = sample_targets(logits, "cross_entropy", class_dim=1, generator=torch.Generator().manual_seed(1))
    assert y.shape == (DRAWS, 2)
    freq = torch.bincount(y.reshape(-1), minlength=3).double() / (2 * DRAWS)
    assert torch.all(_five_sigma(freq, probs, 2 * DRAWS))


def test_rank_three_without_class_dim_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"class_dim=-1") as info:
        sample_targets(torch.randn(2, 7, 11), "cross_entropy")
    assert "(2, 7, 11)" in str(info.value) and "reshape(-1" in str(info.value)
    with pytest.raises(ValueError, match=r"class_dim=-1"):
        sampled_loss(torch.randn(2, 7, 11, requires_grad=True), "cross_entropy")


def test_two_d_and_segmentation_layouts_unchanged():
    """(N, C) and (N, C, H, W) sample along axis 1 without class_dim, as documented."""
    probs = torch.tensor([0.2, 0.7, 0.1], dtype=torch.float64)
    seg = probs.log().float()[None, :, None, None].expand(DRAWS // 4, 3, 2, 2)
    y = sample_targets(seg, "cross_entropy", generator=torch.Generator().manual_seed(2))
    assert y.shape == (DRAWS // 4, 2, 2)
    freq = torch.bincount(y.reshape(-1), minlength=3).double() / DRAWS
    assert torch.all(_five_sigma(freq, probs, DRAWS))
    flat = sample_targets(probs.log().float()[None].expand(DRAWS, 3), "cross_entropy",
                          generator=torch.Generator().manual_seed(2))
    assert flat.shape == (DRAWS,)


def test_bad_class_dim_values():
    z = torch.randn(2, 3, 4)
    for bad, msg in ((0, "batch axis"), (-3, "batch axis"), (3, "out of range"), (1.0, "must be an int")):
        with pytest.raises(ValueError, match=msg):
            sample_targets(z, "cross_entropy", class_dim=bad)
    with pytest.raises(ValueError, match="cross_entropy' only"):
        sampled_loss(z, "mse", class_dim=-1)


def test_sequence_sampled_loss_gradient_matches_a_per_position_loop():
    """The mean sampled loss of (B, T, V) logits with class_dim=-1 equals, with the same draws,
    the mean over every (b, t) of -log softmax(z[b, t])[y[b, t]] (float64 brute force)."""
    b, t, v, d = 3, 4, 6, 5
    w = torch.randn(v, d, dtype=torch.float64, requires_grad=True)
    x = torch.randn(b, t, d, dtype=torch.float64)
    z = x @ w.T
    state = torch.Generator().manual_seed(4).get_state()
    gen = torch.Generator()
    gen.set_state(state)
    (grad,) = torch.autograd.grad(sampled_loss(z, "cross_entropy", class_dim=-1, generator=gen), w)
    gen.set_state(state)
    y = sample_targets(z, "cross_entropy", class_dim=-1, generator=gen)
    total = torch.zeros_like(w)
    for i in range(b):
        for j in range(t):
            total += torch.autograd.grad(-torch.log_softmax(x[i, j] @ w.T, 0)[y[i, j]], w)[0]
    torch.testing.assert_close(grad, total / (b * t), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "obj, name",
    [
        (F.cross_entropy, "cross_entropy"),
        (nn.CrossEntropyLoss(), "cross_entropy"),
        (nn.CrossEntropyLoss(label_smoothing=0.1, reduction="sum"), "cross_entropy"),
        (F.nll_loss, "cross_entropy"),
        (nn.NLLLoss(), "cross_entropy"),
        (F.binary_cross_entropy_with_logits, "bce_with_logits"),
        (nn.BCEWithLogitsLoss(), "bce_with_logits"),
        (F.mse_loss, "mse"),
        (nn.MSELoss(), "mse"),
    ],
    ids=lambda o: o if isinstance(o, str) else getattr(o, "__name__", type(o).__name__),
)
def test_loss_objects_stand_for_the_named_likelihoods(obj, name):
    assert resolve_loss(obj) == name
    z = torch.randn(5, 3, requires_grad=True)
    state = torch.Generator().manual_seed(5).get_state()
    g1, g2 = torch.Generator(), torch.Generator()
    g1.set_state(state)
    g2.set_state(state)
    assert torch.equal(sampled_loss(z, obj, generator=g1), sampled_loss(z, name, generator=g2))


def test_nll_loss_on_log_probabilities_is_the_categorical_likelihood():
    """NLLLoss takes log-probabilities: sampling from softmax(log_softmax(z)) = softmax(z), and
    cross-entropy of log-probabilities equals the NLL, so the mapping is exact."""
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(z, 1)
    state = torch.Generator().manual_seed(6).get_state()
    g = torch.Generator()
    g.set_state(state)
    value = sampled_loss(logp, nn.NLLLoss(), generator=g)
    g.set_state(state)
    y = sample_targets(z, "cross_entropy", generator=g)
    torch.testing.assert_close(value, F.nll_loss(logp, y))


def test_optimizer_accepts_a_loss_object():
    """update_curvature(out, loss=F.cross_entropy) feeds the estimator (it raised a TypeError
    about a torch.Generator before)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = curvkit.TNT(model.parameters(), seed=0)
    out = model(torch.randn(8, 4))
    assert opt.update_curvature(out, loss=nn.CrossEntropyLoss()) is True
    F.cross_entropy(out, torch.randint(0, 3, (8,))).backward()
    opt.step()


@pytest.mark.parametrize(
    "bad, match",
    [
        (F.l1_loss, "does not sample"),
        (nn.L1Loss(), "does not sample"),
        (nn.Linear(2, 2), "does not sample"),
        (lambda out, target: (out - target).sum(), "looks like a training loss"),
        (lambda out: out.sum(), "cannot be called as fn\\(outputs, generator\\)"),
        (42, "must be a name"),
        ("hinge", "loss must be one of"),
    ],
    ids=["F.l1_loss", "L1Loss", "Linear", "training-loss", "one-arg", "int", "unknown-name"],
)
def test_unknown_losses_say_what_a_sampler_looks_like(bad, match):
    z = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match=match) as info:
        sampled_loss(z, bad)
    if not isinstance(bad, (int, str)):
        assert "fn(outputs, generator)" in str(info.value)


def test_sampler_callables_still_work_and_are_checked():
    z = torch.randn(4, 3, requires_grad=True)
    assert sampled_loss(z, lambda out, gen: out.sum()).shape == ()

    def sampler(outputs, generator):
        y = torch.bernoulli(torch.sigmoid(outputs.detach()), generator=generator)
        return F.binary_cross_entropy_with_logits(outputs, y)

    assert sampled_loss(z, sampler, generator=torch.Generator().manual_seed(0)).dim() == 0
    with pytest.raises(ValueError, match="scalar"):
        sampled_loss(z, lambda out, gen: out)
    with pytest.raises(ValueError, match="apply to the named likelihoods"):
        sampled_loss(z, sampler, class_dim=-1)
    with pytest.raises(ValueError, match="failed"):
        sampled_loss(z, lambda out, gen: out + gen)
