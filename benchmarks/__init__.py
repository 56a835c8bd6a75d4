"""The curvkit benchmark harness: the paper's problems at laptop scale, and a small character-level GPT.

Run ``python -m benchmarks`` from the repository root (``--help`` for options). Modules:

* :mod:`benchmarks.data` -- digits and MNIST (IDX) loading; :mod:`benchmarks.curves` -- the
  generated CURVES stand-in; :mod:`benchmarks.charlm` -- the character-level GPT and its text
  (the standard library's ``pydoc_data/topics.py``);
* :mod:`benchmarks.problems` -- models, losses and data of each problem;
* :mod:`benchmarks.methods` -- the compared optimizers (plugins found in curvkit's registry);
* :mod:`benchmarks.settings` -- every default hyperparameter, with its reason;
* :mod:`benchmarks.runner` -- one training run under an epoch or time budget, an epoch at a time;
* :mod:`benchmarks.drive` -- runs one after another or side by side, and their peak memory;
* :mod:`benchmarks.memory`, :mod:`benchmarks.report`, :mod:`benchmarks.plots` -- measurements,
  table, JSON and PNG output; :mod:`benchmarks.cli` -- the command line.
"""

from .cli import main

__all__ = ["main"]
