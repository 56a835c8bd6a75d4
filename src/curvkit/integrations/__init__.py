"""Trainer integrations: curvkit optimizers inside PyTorch Lightning and Hugging Face ``transformers``.

The submodules import their library on first use and need the ``integrations`` extra
(``pip install curvkit[integrations]``):

* :mod:`curvkit.integrations.lightning` -- :class:`~curvkit.integrations.lightning.CurvatureCallback`
  runs the sampled (true-Fisher) pass of TNT and KFAC inside Lightning's automatic optimisation;
* :mod:`curvkit.integrations.transformers` --
  :class:`~curvkit.integrations.transformers.CurvatureTrainer`, a ``transformers.Trainer`` that
  runs the sampled pass and hands K-BFGS its closure.

:func:`sequence_sampler`, :func:`find_curvature_optimizer` and :func:`feeds_every_micro_batch`
are the pieces both share; see
:doc:`/howto/trainers` for what each integration does per step and what it costs.
"""

from __future__ import annotations

from ._common import feeds_every_micro_batch, find_curvature_optimizer, sequence_sampler

__all__ = ["feeds_every_micro_batch", "find_curvature_optimizer", "sequence_sampler"]
