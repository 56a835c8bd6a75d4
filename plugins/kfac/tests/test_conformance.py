"""The core conformance suite (curvkit.testing) run on every part the plugin registers."""

import pytest

from curvkit.testing import check_estimator, check_method, check_part, conformance_cases

import curvkit_kfac


def test_the_plugin_registers_its_parts_through_the_entry_point():
    assert set(conformance_cases("curvkit-kfac", "curvkit_kfac")) == {
        ("estimator", "kfac"), ("method", "KFAC"),
        ("estimator", "ekfac"), ("preconditioner", "eigen_corrected"), ("method", "EKFAC"),
    }


# eigen_corrected reads the ekfac estimator's statistics (reads_statistics), which the standalone
# check_preconditioner cannot make up: it is checked inside its optimizer by check_method(EKFAC)
# and against the dense reference in test_ekfac.py
@pytest.mark.parametrize(
    "kind,name", [c for c in conformance_cases("curvkit-kfac", "curvkit_kfac") if c != ("preconditioner", "eigen_corrected")]
)
def test_conformance(kind, name):
    check_part(kind, name)


def test_ekfac_conforms_with_options():
    check_estimator(curvkit_kfac.EKFACEstimator(evidence="empirical", scale_decay=0.5), inverter="eigenbasis",
                    preconditioner="eigen_corrected")
    check_method(curvkit_kfac.EKFAC, options={"max_factor_dim": 5})


@pytest.mark.parametrize(
    "options",
    [
        {"pi_damping": True},
        {"evidence": "empirical"},
        {"fallback": "momentum", "gradient_scale": 1.0, "stat_decay": 0.5},
    ],
)
def test_estimator_options_conform(options):
    # a fixed gradient_scale declares another loss convention than the check's batch means
    check_estimator(curvkit_kfac.KFACEstimator(**options), inverter="cholesky",
                    check_accumulation="gradient_scale" not in options)


def test_preset_conforms_with_bce_and_unfactored_modes():
    check_method(curvkit_kfac.KFAC, options={"pi_damping": True, "max_factor_dim": 5})
