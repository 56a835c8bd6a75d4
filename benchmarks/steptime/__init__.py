"""The step-time benchmark: what a curvature step costs against its arithmetic.

Run ``python -m benchmarks.steptime`` from the repository root (``--help`` for options). It times
one optimisation step of every installed curvkit method (at the TNT paper's schedules), of
:class:`torch.optim.Adam` and :class:`torch.optim.SGD`, and of other implementations of the same
work when they are installed (ASDL, heavyball, :class:`torch.optim.Muon`), on the shapes of the
paper's MNIST autoencoder, and sets each against an *arithmetic floor*: the same work timed piece
by piece with plain torch calls. Modules:

* :mod:`benchmarks.steptime.cases` -- the model, the data and every measured case (how each
  method is built and stepped);
* :mod:`benchmarks.steptime.floor` -- the floor pieces, each method's recipe and the amortisation
  by the schedule;
* :mod:`benchmarks.steptime.worker` -- one measurement in a fresh process;
* :mod:`benchmarks.steptime.cli` -- interleaved rounds, the table, JSON and the plot.
"""

from typing import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (see :func:`benchmarks.steptime.cli.main`)."""
    from .cli import main as cli_main  # lazy: ``-m benchmarks.steptime.worker`` must not import the CLI

    return cli_main(argv)
