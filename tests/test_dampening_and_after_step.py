"""Momentum dampening, and the closure protocol of estimators that re-evaluate after the step."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import curvkit
from curvkit import BlockEvidence, CurvatureEstimator, EvidenceSpec, PartConfig, Source

D = torch.float64


def plain(params, **options):
    """A composition whose direction is the momentum buffer itself."""
    return curvkit.compose(params, estimator="tensor_normal", estimator_options={"evidence": "empirical"},
                           preconditioner="identity", inverter="identity", **options)


@pytest.mark.parametrize("dampening", [0.0, 0.5, 0.9])
def test_dampened_momentum_is_an_average_from_zero(dampening):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 2, dtype=D))
    opt = plain([w], lr=0.1, momentum=0.9, dampening=dampening)
    ref_w, buf = w.detach().clone(), torch.zeros(3, 2, dtype=D)
    for _ in range(4):
        g = torch.randn(3, 2, dtype=D)
        w.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + (1 - dampening) * g
        ref_w = ref_w - 0.1 * buf
        torch.testing.assert_close(w.detach(), ref_w, rtol=1e-14, atol=1e-14)


def test_zero_dampening_matches_torch_sgd_momentum():
    torch.manual_seed(1)
    w = nn.Parameter(torch.randn(4, dtype=D))
    v = nn.Parameter(w.detach().clone())
    ours, sgd = plain([w], lr=0.05, momentum=0.9), torch.optim.SGD([v], lr=0.05, momentum=0.9)
    for _ in range(5):
        g = torch.randn(4, dtype=D)
        w.grad, v.grad = g.clone(), g.clone()
        ours.step()
        sgd.step()
    torch.testing.assert_close(w, v, rtol=1e-14, atol=1e-14)


def test_dampening_is_validated_and_per_group():
    w, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="dampening"):
        plain([w], dampening=1.0)
    opt = plain([{"params": [w]}, {"params": [b], "dampening": 0.5}], lr=1.0, momentum=0.0)
    w.grad, b.grad = torch.ones(2), torch.ones(2)
    opt.step()
    assert torch.equal(w.detach(), torch.zeros(2)) and torch.equal(b.detach(), torch.full((2,), 0.5))


@dataclass(frozen=True)
class _NoOptions(PartConfig):
    pass


class Reevaluating(CurvatureEstimator):
    """Needs the closure after the step; records what the closure produced."""

    Config = _NoOptions
    name = "reevaluating"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    @property
    def evidence(self) -> EvidenceSpec:
        return EvidenceSpec(source=Source.MINIBATCH, closure=True)

    def init_state(self, block):
        return {}

    def update(self, block, state, evidence: BlockEvidence, *, decay=None):
        return None

    def factors(self, block, state, *, damping):
        return None

    def after_step(self, blocks, states, *, closure, recorder):
        closure()
        self.seen.append(blocks[0].params[0].grad.detach().clone())


def _setup():
    torch.manual_seed(2)
    model = nn.Linear(3, 1).to(D)
    est = Reevaluating()
    opt = curvkit.compose(model.parameters(), estimator=est, preconditioner="identity", inverter="identity",
                          lr=0.1, momentum=0.0)
    return model, est, opt


def _grad_at(model, x):
    model.zero_grad()
    model(x).pow(2).sum().backward()
    return model.weight.grad.detach().clone()


@pytest.mark.parametrize("style", ["manual", "manual_keep_tensors", "closure_only"])
def test_after_step_closure_leaves_the_step_gradient_and_is_never_mistaken_for_a_fresh_one(style):
    model, est, opt = _setup()
    calls = []
    for t in range(3):
        x = torch.randn(5, 3, dtype=D) + t

        def closure():
            calls.append(t)
            opt.zero_grad(set_to_none=(style != "manual_keep_tensors"))
            loss = model(x).pow(2).sum()
            loss.backward()
            return loss

        if style != "closure_only":
            opt.zero_grad(set_to_none=(style == "manual"))
            model(x).pow(2).sum().backward()
        expected = model.weight.grad.detach().clone() if style != "closure_only" else None
        w_before = model.weight.detach().clone()
        opt.step(closure)
        at_t = (w_before - model.weight.detach()) / 0.1  # the step used this gradient
        if expected is not None:
            torch.testing.assert_close(at_t, expected, rtol=1e-12, atol=1e-12)
        # p.grad keeps the step's gradient (not the closure's at theta_{t+1})
        torch.testing.assert_close(model.weight.grad, at_t, rtol=1e-12, atol=1e-12)
        # the estimator saw the gradient at the new parameters on the same batch
        probe = nn.Linear(3, 1).to(D)
        probe.load_state_dict(model.state_dict())
        torch.testing.assert_close(est.seen[-1], _grad_at(probe, x), rtol=1e-12, atol=1e-12)
    per_step = 2 if style == "closure_only" else 1
    assert calls == [t for t in range(3) for _ in range(per_step)]
