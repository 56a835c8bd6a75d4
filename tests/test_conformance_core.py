"""The conformance suite on every core part, and proof that it catches broken parts."""

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import Tensor

import curvkit
from curvkit.testing import (
    ConformanceError,
    check_estimator,
    check_inverter,
    check_method,
    check_part,
    check_preconditioner,
    conformance_cases,
)


def fractional_power_reference(power):
    """Dense (U + eps I)^-p by scipy, independent of torch's eigh."""

    def ref(matrix, damping, order):
        p = 1.0 / (2 * order) if power == "1/2k" else power
        m = matrix.numpy() + damping * np.eye(matrix.shape[0])
        return torch.from_numpy(np.real(scipy.linalg.fractional_matrix_power(m, -p)))

    return ref


# -------------------------------------------------------------------------- core parts conform
@pytest.mark.parametrize("power", [1.0, "1/2k"])
def test_damped_eigen_conforms_and_matches_dense_reference(power):
    check_inverter(curvkit.DampedEigen(power=power), reference=fractional_power_reference(power))


def test_damped_eigen_relative_damping_conforms():
    check_inverter(curvkit.DampedEigen(power="1/2k", relative_damping=True))


def test_cholesky_conforms_and_matches_dense_inverse():
    check_inverter(curvkit.Cholesky(), reference=fractional_power_reference(1.0))


def test_identity_inverter_conforms_and_returns_its_input():
    check_inverter(curvkit.IdentityInverter(), reference=lambda m, damping, order: m)


def test_inverters_conform_in_float32():
    check_inverter(curvkit.DampedEigen(power="1/2k"), dtype=torch.float32)
    check_inverter(curvkit.Cholesky(), dtype=torch.float32)


@pytest.mark.parametrize("name", ["kronecker_mode", "identity"])
def test_preconditioners_conform(name):
    check_part("preconditioner", name)
    check_preconditioner(curvkit.get("preconditioner", name)(), dtype=torch.float32)


@pytest.mark.parametrize("evidence", ["sampled", "empirical"])
def test_tensor_normal_conforms(evidence):
    check_estimator(curvkit.TensorNormal(evidence=evidence))


def test_tensor_normal_conforms_with_bce_problem_and_unfactored_modes():
    def make_model():
        return torch.nn.Sequential(torch.nn.Linear(4, 7), torch.nn.Tanh(), torch.nn.Linear(7, 4))

    def make_data(gen, n):
        x = torch.rand(n, 4, generator=gen)
        return x, (x > 0.5).to(x.dtype)

    check_estimator(
        curvkit.TensorNormal(stat_decay=0.5),
        make_model=make_model,
        make_data=make_data,
        loss="bce_with_logits",
        optimizer_options={"max_factor_dim": 5, "curvature_every": 2, "invert_every": 4},
    )


def test_tnt_preset_conforms():
    check_method(curvkit.TNT, options={"lr": 1e-3})
    check_part("method", "TNT")


def test_conformance_cases_lists_every_core_part():
    cases = set(conformance_cases("curvkit."))
    expected = {
        ("estimator", "tensor_normal"),
        ("preconditioner", "kronecker_mode"),
        ("preconditioner", "identity"),
        ("inverter", "damped_eigen"),
        ("inverter", "cholesky"),
        ("inverter", "identity"),
        ("method", "TNT"),
        ("inverter", "eigenbasis"),
        ("preconditioner", "adam_eigenbasis"),
        ("preconditioner", "adamw"),
        ("preconditioner", "muon"),
        ("preconditioner", "partition"),
        ("estimator", "none"),
        ("method", "SOAP"),
        ("method", "KL_Shampoo"),
        ("method", "TNT_KL"),
        ("method", "Muon"),
    }
    assert expected <= cases
    assert all(curvkit.available(kind)[kind][name].startswith("curvkit.") for kind, name in cases)
    assert set(conformance_cases("curvkit.", kinds=("inverter",))) == {
        c for c in expected if c[0] == "inverter"
    }


# -------------------------------------------------------------------------- the suite can fail
class _Base(curvkit.Inverter):
    Config = curvkit.DampedEigen.Config

    def good(self, matrices, damping, order):
        return curvkit.DampedEigen().invert(matrices, damping=damping, order=order)


class InPlaceInverter(_Base):
    def invert(self, matrices, *, damping, order):
        matrices.add_(damping[:, None, None] * torch.eye(matrices.shape[-1], dtype=matrices.dtype))
        return torch.linalg.inv(matrices)


class UndampedInverter(_Base):
    def invert(self, matrices, *, damping, order):
        vals, vecs = torch.linalg.eigh(matrices)
        return (vecs / vals.unsqueeze(-2)) @ vecs.transpose(-1, -2)


class BatchCoupledInverter(_Base):
    def invert(self, matrices, *, damping, order):
        return self.good(matrices, damping, order) / matrices.shape[0]


class NoisyInverter(_Base):
    def invert(self, matrices, *, damping, order):
        return self.good(matrices, damping, order) + 1e-6 * torch.rand_like(matrices)


class WrongShapeInverter(_Base):
    def invert(self, matrices, *, damping, order):
        return self.good(matrices, damping, order)[:, :, :1]


@pytest.mark.parametrize(
    "inverter, message",
    [
        (InPlaceInverter(), "modified its input"),
        (UndampedInverter(), "not finite"),
        (BatchCoupledInverter(), "batched and one-by-one"),
        (NoisyInverter(), "not deterministic"),
        (WrongShapeInverter(), "returned shape"),
    ],
)
def test_check_inverter_catches_broken_inverters(inverter, message):
    with pytest.raises(AssertionError, match=message):
        check_inverter(inverter)


def test_check_inverter_catches_a_wrong_power_through_the_reference():
    with pytest.raises(ConformanceError, match="differs from the reference"):
        check_inverter(curvkit.DampedEigen(power=1.0), reference=fractional_power_reference(0.5))


class _PBase(curvkit.Preconditioner):
    Config = curvkit.KroneckerMode.Config

    def apply(self, block, state, direction, inverses, *, gradient):
        return curvkit.KroneckerMode().apply(block, state, direction, inverses, gradient=gradient)


class InPlacePreconditioner(_PBase):
    def apply(self, block, state, direction, inverses, *, gradient):
        return direction.mul_(0.5)


class FlatteningPreconditioner(_PBase):
    def apply(self, block, state, direction, inverses, *, gradient):
        return super().apply(block, state, direction, inverses, gradient=gradient).reshape(-1)


class NoFallbackPreconditioner(_PBase):
    def apply(self, block, state, direction, inverses, *, gradient):
        if inverses is None:
            return torch.full_like(direction, float("nan"))
        return super().apply(block, state, direction, inverses, gradient=gradient)


class _Opaque:
    pass


class UnsavableStatePreconditioner(_PBase):
    def init_state(self, block):
        return {"helper": _Opaque()}


class ForgetfulPreconditioner(_PBase):
    """Keeps a call counter on the instance, outside the per-block state, so a reloaded state
    cannot reproduce the next direction."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = 0

    def apply(self, block, state, direction, inverses, *, gradient):
        self.calls += 1
        return super().apply(block, state, direction, inverses, gradient=gradient) * self.calls


@pytest.mark.parametrize(
    "pre, message",
    [
        (InPlacePreconditioner(), "in place"),
        (FlatteningPreconditioner(), "returned shape"),
        (NoFallbackPreconditioner(), "not finite"),
        (UnsavableStatePreconditioner(), "does not survive"),
        (ForgetfulPreconditioner(), "after a state round trip"),
    ],
)
def test_check_preconditioner_catches_broken_preconditioners(pre, message):
    with pytest.raises(AssertionError, match=message):
        check_preconditioner(pre)


class AsymmetricFactors(curvkit.TensorNormal):
    def factors(self, block, state, *, damping):
        out = super().factors(block, state, damping=damping)
        if out is None:
            return out
        return [None if f is None else curvkit.Factor(torch.triu(f.matrix) + 1.0, f.damping) for f in out]


class UnguardedNormalisation(curvkit.TensorNormal):
    """Normalises by the trace without guarding against zero statistics."""

    def factors(self, block, state, *, damping):
        out = super().factors(block, state, damping=damping)
        if out is None:
            return out
        return [None if f is None else curvkit.Factor(f.matrix / state["trace"], f.damping) for f in out]


class NoStateCheck(curvkit.TensorNormal):
    def check_state(self, block, state):
        return None


class HiddenCounter(curvkit.TensorNormal):
    """Keeps part of its statistics on the instance, outside the state dict."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen = 0

    def update(self, block, state, evidence, *, decay=None):
        self.seen += 1
        super().update(block, state, evidence, decay=decay)

    def factors(self, block, state, *, damping):
        out = super().factors(block, state, damping=damping)
        if out is None:
            return out
        return [None if f is None else curvkit.Factor(f.matrix * self.seen, f.damping) for f in out]


class IgnoresDecay(curvkit.TensorNormal):
    def update(self, block, state, evidence, *, decay=None):
        super().update(block, state, evidence, decay=None)


class RepeatedFactors(curvkit.TensorNormal):
    """Hands over every factor twice (only tiled layouts with ``factor_sizes`` may give more than
    one factor per mode)."""

    def factors(self, block, state, *, damping):
        out = super().factors(block, state, damping=damping)
        return out if out is None else out + out


@pytest.mark.filterwarnings("ignore::curvkit.CurvkitWarning")
@pytest.mark.parametrize(
    "estimator, message",
    [
        (AsymmetricFactors(), "not symmetric"),
        (UnguardedNormalisation(), "not finite"),
        (NoStateCheck(), "implement check_state"),
        (HiddenCounter(evidence="empirical"), "resum"),
        (IgnoresDecay(evidence="empirical"), "decay"),
    ],
)
def test_check_estimator_catches_broken_estimators(estimator, message):
    with pytest.raises(AssertionError, match=message):
        check_estimator(estimator)


def test_check_estimator_catches_more_factors_than_modes():
    # the identity preconditioner ignores the inverses, so training runs and the factor check decides
    with pytest.raises(ConformanceError, match=r"got 6 factors, expected one per mode \(3\)"):
        check_estimator(RepeatedFactors(), preconditioner="identity")


def test_check_estimator_names_the_part_in_its_message():
    with pytest.raises(ConformanceError, match=r"^estimator tensor_normal: .*not symmetric"):
        check_estimator(AsymmetricFactors())


class NoisySGD(torch.optim.SGD):
    """Draws noise from the global generator: its state dict cannot reproduce the next step."""

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(torch.randn_like(p), alpha=1e-3)


def noisy_sgd(params, *, model=None, lr=0.01):
    return NoisySGD(params, lr=lr, momentum=0.9)


def exploding(params, *, model=None):
    return torch.optim.SGD(params, lr=1e30)


def not_an_optimizer(params, *, model=None):
    return object()


@pytest.mark.parametrize(
    "factory, message",
    [(noisy_sgd, "resum"), (exploding, "not finite"), (not_an_optimizer, "torch.optim.Optimizer")],
)
def test_check_method_catches_broken_presets(factory, message):
    with pytest.raises(AssertionError, match=message):
        check_method(factory)


def test_check_method_passes_a_plain_torch_optimizer():
    check_method(lambda params, model=None: torch.optim.SGD(params, lr=0.01, momentum=0.9))


def test_check_part_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        check_part("optimizer", "TNT")
