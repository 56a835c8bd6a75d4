"""The conformance suite on every Shampoo part, in its main configurations."""

import pytest
import torch

from curvkit import Factor
from curvkit.testing import ConformanceError, check_estimator, check_method, check_part, conformance_cases
from curvkit_shampoo import Shampoo, ShampooStatistics, TiledLayout


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


class DropsALastTile(ShampooStatistics):
    """Forgets the factors of the last tile of every tiled block."""

    def factors(self, block, state, *, damping):
        out = super().factors(block, state, damping=damping)
        return out[: -block.order] if out is not None and isinstance(block.layout, TiledLayout) else out


class WholeModeFactors(ShampooStatistics):
    """Hands over one whole-mode factor per (tile, mode) instead of the tile's own."""

    def factors(self, block, state, *, damping):
        out = super().factors(block, state, damping=damping)
        if out is None or not isinstance(block.layout, TiledLayout):
            return out
        k = block.order
        return [None if f is None else Factor(torch.eye(block.shape[j % k], dtype=f.matrix.dtype), damping)
                for j, f in enumerate(out)]


@pytest.mark.parametrize("estimator, message", [(DropsALastTile(block_size=2), r"expected one per \(tile, mode\)"),
                                                (WholeModeFactors(block_size=2), "mode 0 of tile 0: factor of shape")])
def test_the_estimator_check_still_catches_wrong_per_tile_factors(estimator, message):
    with pytest.raises(ConformanceError, match=message):
        check_estimator(estimator, inverter="coupled_newton", preconditioner="identity")  # inverses unused
