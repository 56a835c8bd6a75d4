"""The collaborators of :class:`curvkit.CurvatureOptimizer`, one job each.

* :mod:`~curvkit.engine.params` -- parameter and param-group normalisation and validation;
* :mod:`~curvkit.engine.runstate` -- the per-step counters, in one shared mutable object;
* :mod:`~curvkit.engine.health` -- device-side fault counters, read only by ``health()``;
* :mod:`~curvkit.engine.evidence` -- collecting curvature evidence (sampled backward, minibatch
  gradient, layer records, micro-batch accumulation) and feeding the estimator;
* :mod:`~curvkit.engine.update` -- momentum, direction and parameter update, batched per group
  of same-shape blocks, masked on the device;
* :mod:`~curvkit.engine.inversion` -- the inversion step: state repairs, batched inversions and
  their fallbacks, with the step's one host read (divided among ranks when distributed);
* :mod:`~curvkit.engine.checkpoint` -- the state dict in torch's per-parameter layout;
* :mod:`~curvkit.engine.sharding` -- FSDP2 (DTensor) parameters: full gradients, the stashed
  sampled backward, each rank's shard of the update.
"""
