r"""Conformance checks that any registered part (core or plugin) can run under pytest.

Each check drives a part through its contract with small random inputs or a tiny model and raises
:class:`ConformanceError` (an :class:`AssertionError`) with a message naming the part and the
property that failed. A plugin author adds one line per part::

    from curvkit.testing import check_estimator, check_inverter, check_method, check_preconditioner

    def test_my_inverter_conforms():
        check_inverter(MyInverter())

    def test_my_estimator_conforms():
        check_estimator(MyEstimator(), inverter="damped_eigen")

or checks every part a plugin registered::

    @pytest.mark.parametrize("kind,name", conformance_cases("curvkit-myplugin", "curvkit_myplugin"))
    def test_conformance(kind, name):
        check_part(kind, name)

Checks:

* :func:`check_inverter`: shapes and dtypes kept, batched = one by one, finite on zero and
  rank-deficient factors, deterministic, inputs untouched, symmetric PSD results, an optional
  dense reference.
* :func:`check_preconditioner`: views of rank 1 to 3, ``inverses=None`` fallback, unfactored
  modes, inputs untouched, per-block state through ``torch.save``/``torch.load(weights_only=True)``.
* :func:`check_estimator`: inside an optimizer on a tiny model, through the estimator's own
  evidence path: symmetric PSD factors of the view shapes, zero and rank-deficient evidence,
  exact resume, state validation, misuse errors, the explicit-decay contract.
* :func:`check_method`: a preset trains without NaN and resumes bit for bit.
* :func:`count_host_reads`: counts host reads of tensor values (device synchronisations) in a block
  of code, or in given methods only.
"""

from ._common import ConformanceError, Problem, default_data, default_model, random_psd, roundtrip, train_step
from .cases import check_part, conformance_cases
from .estimators import check_estimator
from .host_reads import HostReads, count_host_reads
from .inverters import check_inverter
from .methods import check_method
from .preconditioners import check_preconditioner, make_block
from .resume import check_exact_resume

__all__ = [
    "ConformanceError",
    "HostReads",
    "Problem",
    "check_estimator",
    "check_exact_resume",
    "check_inverter",
    "check_method",
    "check_part",
    "check_preconditioner",
    "conformance_cases",
    "count_host_reads",
    "default_data",
    "default_model",
    "make_block",
    "random_psd",
    "roundtrip",
    "train_step",
]
