"""The conformance suite on every Shampoo part, in its main configurations."""

import pytest
import torch

from curvkit.testing import check_estimator, check_method, check_part, conformance_cases
from curvkit_shampoo import Shampoo, ShampooStatistics


def test_every_registered_shampoo_part_conforms():
    cases = conformance_cases("curvkit-shampoo", "curvkit_shampoo")
    assert set(cases) == {("estimator", "shampoo"), ("inverter", "coupled_newton"),
                          ("preconditioner", "grafted_kronecker"), ("method", "Shampoo")}
    for kind, name in cases:
        check_part(kind, name)


@pytest.mark.parametrize(
    "options, inverter",
    [({"accumulate": "sum"}, "coupled_newton"), ({"block_size": 2}, "coupled_newton"),
     ({"stat_decay": 0.5}, "damped_eigen")],
)
def test_estimator_conforms_in_its_configurations(options, inverter):
    check_estimator(ShampooStatistics(**options), inverter=inverter, inverter_options={"power": "1/2k"},
                    preconditioner="grafted_kronecker")


@pytest.mark.parametrize(
    "options",
    [{"graft": "adam", "start_step": 2, "block_size": 4}, {"root_solver": "eigen", "relative_damping": True},
     {"accumulate": "sum", "graft": "sgd", "curvature_every": 2, "invert_every": 3}],
)
def test_preset_conforms_in_its_configurations(options):
    check_method(Shampoo, options={"lr": 1e-2, **options})
    check_method(Shampoo, options={"lr": 1e-2, **options}, dtype=torch.float64)
