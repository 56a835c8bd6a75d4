"""The pieces the trainer integrations share: the sampler with a class axis, and finding the
curvkit optimizer behind wrappers (no trainer library needed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import curvkit
from curvkit.fisher import sample_targets
from curvkit.integrations import find_curvature_optimizer, sequence_sampler


def test_sequence_sampler_is_the_loss_over_the_vocabulary_axis():
    """Against a per-position float64 loop with the same draws (not against sampled_loss, which
    the sampler calls)."""
    logits = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    state = torch.Generator().manual_seed(0).get_state()
    g = torch.Generator()
    g.set_state(state)
    value = sequence_sampler("cross_entropy", class_dim=-1)(logits, g)
    g.set_state(state)
    y = sample_targets(logits, "cross_entropy", class_dim=-1, generator=g)
    expected = sum(-torch.log_softmax(logits[b, t], 0)[y[b, t]] for b in range(3) for t in range(5)) / 15
    torch.testing.assert_close(value, expected)
    summed = sequence_sampler(F.cross_entropy, class_dim=-1, reduction="sum")
    g.set_state(state)
    torch.testing.assert_close(summed(logits, g), expected * 15)


def test_sequence_sampler_passes_plain_names_through_and_checks_options():
    assert sequence_sampler("mse") == "mse"
    assert sequence_sampler(torch.nn.BCEWithLogitsLoss()) == "bce_with_logits"
    for bad, match in (({"class_dim": 0}, "non-zero int"), ({"class_dim": True}, "non-zero int"),
                       ({"reduction": "avg"}, "reduction")):
        with pytest.raises(ValueError, match=match):
            sequence_sampler("cross_entropy", **bad)
    with pytest.raises(ValueError, match="cross_entropy' only"):
        sequence_sampler("mse", class_dim=-1)
    with pytest.raises(ValueError, match="sampler callable of your own"):
        sequence_sampler(lambda out, gen: out.sum(), class_dim=-1)


class _Wrapper:
    def __init__(self, optimizer):
        self.optimizer = optimizer


def test_find_curvature_optimizer_unwraps():
    opt = curvkit.TNT([torch.nn.Parameter(torch.zeros(2, 2))])
    assert find_curvature_optimizer(opt) is opt
    assert find_curvature_optimizer(_Wrapper(_Wrapper(opt))) is opt
    assert find_curvature_optimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)) is None
    loop = _Wrapper(None)
    loop.optimizer = loop
    assert find_curvature_optimizer(loop) is None
