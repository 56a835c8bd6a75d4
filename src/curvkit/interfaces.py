r"""The three part interfaces and the small value types they exchange.

Every curvature method in curvkit is a composition of three parts, each with one job:

* a :class:`CurvatureEstimator` turns *evidence* (a sampled-target gradient, the minibatch
  gradient, or layer inputs and output gradients) into per-mode statistics and hands the
  optimizer one matrix per tensor mode to invert (or ``None`` for an identity mode);
* an :class:`Inverter` turns a batch of same-size symmetric factors into their preconditioning
  matrices, for example :math:`(U + \epsilon I)^{-p}`;
* a :class:`Preconditioner` forms the update direction from the (momentum) buffer and the
  inverted factors, for example :math:`P = M \times_1 V_1 \times_2 \cdots \times_k V_k`.

The optimizer (:class:`curvkit.CurvatureOptimizer`) owns the schedule, the per-block state,
momentum, weight decay and the collection of evidence; the parts are stateless apart from their
frozen, validated config.  Per-block state is a plain ``dict`` of tensors and Python values that
each part creates in ``init_state`` and mutates in place, so that ``state_dict`` can hold it.
"""

from __future__ import annotations

import dataclasses
import enum
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, NamedTuple, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from .blocks import Block
    from .hooks import LayerRecorder

__all__ = [
    "BlockEvidence",
    "CurvatureEstimator",
    "EvidenceSpec",
    "Factor",
    "Inverter",
    "Part",
    "PartConfig",
    "Preconditioner",
    "Source",
]


class Source(str, enum.Enum):
    """Which backward pass provides an estimator's evidence.

    ``SAMPLED``: the backward of the loss whose targets are sampled from the model's own
    predictive distribution (true Fisher), run by
    :meth:`~curvkit.CurvatureOptimizer.update_curvature`.
    ``MINIBATCH``: the ordinary backward of the user's loss with the true labels (empirical
    Fisher, Shampoo), read in :meth:`~curvkit.CurvatureOptimizer.step`.
    """

    SAMPLED = "sampled"
    MINIBATCH = "minibatch"


@dataclass(frozen=True)
class EvidenceSpec:
    """What an estimator needs the optimizer to collect.

    Attributes:
        source: which backward pass the statistics come from.
        layer_io: the estimator needs module inputs, outputs and output gradients (KFAC,
            K-BFGS); the optimizer then needs the ``model`` and records them with a
            :class:`~curvkit.hooks.LayerRecorder`.
        closure: the estimator needs the loss re-evaluated on the same batch after the
            parameter update (K-BFGS), so :meth:`~curvkit.CurvatureOptimizer.step` requires a
            closure.
        layer_outputs: with ``layer_io``, also keep each layer's outputs (K-BFGS needs the mean
            pre-activations); off by default, so recorders keep nothing an estimator does not use.
        parameter_gradients: the estimator reads the parameter gradients of its backward pass.
            A ``layer_io`` estimator that only needs layer inputs and output gradients (KFAC)
            sets it ``False``, and the sampled backward then differentiates with respect to the
            recorded layer outputs only (no weight-gradient GEMMs).
        squared_norms: the estimator reads ``BlockEvidence.squared_norm`` (the squared norms
            that the finiteness check of the evidence computes anyway); off by default, so the
            feed forms them only for an estimator that uses them.
    """

    source: Source = Source.SAMPLED
    layer_io: bool = False
    closure: bool = False
    layer_outputs: bool = False
    parameter_gradients: bool = True
    squared_norms: bool = False


@dataclass
class BlockEvidence:
    r"""The evidence for one block on one statistics update.

    Attributes:
        gradients: one gradient per parameter of the block (sampled or minibatch, as the
            estimator's :class:`EvidenceSpec` asked), ``None`` where autograd produced none.
        layer: for ``layer_io`` estimators, the recorder holding the block module's recorded
            inputs, outputs and output gradients; otherwise ``None``.
        batch_size: number of examples behind the evidence, when known.
        valid: a 0-d bool tensor on the block's device, ``False`` when the evidence was not
            finite (its gradients are then zeros). An estimator that honours it leaves its
            statistics exactly unchanged for invalid evidence without reading the flag on the
            host (``torch.where`` / ``lerp`` with a 0 weight); one that ignores it folds zero
            evidence in. ``None`` means valid.
        squared_norm: the squared Frobenius norm :math:`\lVert g \rVert_F^2` of the block's one
            gradient, a 0-d tensor in its dtype, as the finiteness check computed it (0 where
            ``valid`` is ``False``); ``None`` when the block has several gradients or the check
            computed no norm, or the estimator's :class:`EvidenceSpec` did not ask for it
            (``squared_norms``). An estimator may use it instead of reducing the gradient again.
    """

    gradients: list[Tensor | None]
    layer: "LayerRecorder | None" = None
    batch_size: int | None = None
    valid: Tensor | None = None
    squared_norm: Tensor | None = None


class Factor(NamedTuple):
    """A symmetric positive semi-definite matrix to invert, with its damping.

    ``damping`` is a Python float or a 0-d tensor (a tensor keeps data-dependent damping such as
    KFAC's pi-adjusted split free of host synchronisation).
    """

    matrix: Tensor
    damping: float | Tensor


@dataclass(frozen=True)
class PartConfig:
    """Base class of the frozen dataclass configs of parts.

    Subclasses validate their fields in ``__post_init__`` and raise :class:`ValueError` naming the
    field, the value and what is accepted.
    """

    def to_dict(self) -> dict[str, Any]:
        """The config as a dict of plain Python values (what ``state_dict`` stores)."""
        return dataclasses.asdict(self)


class Part(ABC):
    """Common behaviour of estimators, preconditioners and inverters.

    A part is built from keyword options (validated through its ``Config`` dataclass) or from a
    ready ``Config``; it keeps no per-block state of its own.
    """

    Config: ClassVar[type[PartConfig]] = PartConfig
    #: The registry name, set by :func:`curvkit.register`.
    name: ClassVar[str] = ""
    #: Config options that may differ between a saved state and the optimizer loading it (with a
    #: warning); any other difference changes the meaning of the saved state and is refused.
    state_neutral_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: PartConfig | None = None, **options: Any) -> None:
        if config is not None and options:
            raise ValueError(
                f"{type(self).__name__}: pass either config= or keyword options, not both "
                f"(got config and {sorted(options)})"
            )
        if config is None:
            known = {f.name for f in dataclasses.fields(self.Config)}
            unknown = sorted(set(options) - known)
            if unknown:
                raise ValueError(
                    f"{type(self).__name__} got unknown option(s) {unknown}; "
                    f"valid options are {sorted(known)}"
                )
            config = self.Config(**options)
        elif not isinstance(config, self.Config):
            raise ValueError(
                f"{type(self).__name__} expects config of type {self.Config.__name__}, "
                f"got {type(config).__name__}"
            )
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class CurvatureEstimator(Part):
    r"""Turns evidence into per-mode curvature statistics of each block.

    The contract, per block:

    1. :meth:`init_state` creates the block's statistics (a dict of tensors/values).
    2. :meth:`update` folds one piece of evidence into them, in place. With ``decay=None`` it
       applies its own averaging rule (for example an EMA whose first update sets the
       statistics); with an explicit ``decay`` it computes
       :math:`S \leftarrow \text{decay}\, S + (1 - \text{decay})\, \hat S`, which the warm start
       uses with ``decay = n / (n + 1)`` for an exact mean over batches.
    3. :meth:`factors` returns, for each mode of the block's view, a :class:`Factor` to invert or
       ``None`` (identity on that mode), or ``None`` altogether while no statistics exist.

    Estimators that need layer data override :meth:`plan` (to build blocks from modules) and
    declare ``layer_io`` in :attr:`evidence`. Estimators that need a second evaluation after the
    step (K-BFGS) declare ``closure`` and implement :meth:`after_step`.

    **Micro-batch accumulation.** An estimator whose per-batch statistic is a mean over examples
    can split :meth:`update` into :meth:`batch_statistics` (the *additive* statistics of one
    batch: sums over its examples together with their counts, so that the statistics of several
    micro-batches are the entrywise sum of theirs) and :meth:`fold` (normalise the sums and fold
    them into the running statistics). The optimizer then gathers the sums of every micro-batch
    of a step -- one forward/backward per micro-batch, several before one ``step()`` -- and folds
    them once, so the step's statistic is the example-weighted mean over the whole batch,
    :math:`\hat S = \sum_i \Sigma_i / \sum_i n_i`, exactly as if the micro-batches had been
    one batch. Layer-based estimators need this: their evidence (the layer records) lives for
    one forward pass only. :attr:`accumulates` says whether an estimator implements it.
    """

    #: Whether the statistics are linear in the evidence (so that averaging them over ranks
    #: equals the statistics of the global batch; see ``sync_statistics`` of the optimizer).
    linear_statistics: ClassVar[bool] = True

    #: Whether :meth:`factors` returns the preconditioning matrices themselves (inverse factors
    #: maintained directly, as K-BFGS does); such an estimator must be composed with the
    #: ``identity`` inverter, which the optimizer enforces.
    factors_are_inverses: ClassVar[bool] = False

    #: Whether the estimator detects and restarts its own non-finite statistics (K-BFGS); the
    #: optimizer otherwise checks them at every inversion (and on save and load) and restarts
    #: them through :meth:`init_state`, counted as ``statistics_restarted``.
    heals_statistics: ClassVar[bool] = False

    @property
    def evidence(self) -> EvidenceSpec:
        """The evidence this estimator needs (may depend on the config)."""
        return EvidenceSpec()

    def plan(
        self,
        named_params: Sequence[tuple[str, torch.nn.Parameter, int]],
        *,
        model: torch.nn.Module | None,
        max_factor_dim: int | None,
    ) -> list["Block"]:
        """Group parameters into blocks with tensor views.

        Args:
            named_params: ``(name, parameter, param_group_index)`` for every parameter.
            model: the model, when the optimizer was given one.
            max_factor_dim: modes larger than this get no dense factor.

        Returns:
            Blocks covering every parameter exactly once. The default is one block per
            parameter with the standard views of :func:`curvkit.blocks.default_block`.
        """
        from .blocks import default_block

        return [default_block(name, p, gi, max_factor_dim=max_factor_dim) for name, p, gi in named_params]

    @abstractmethod
    def init_state(self, block: "Block") -> dict[str, Any]:
        """Create the statistics of a block (before any evidence)."""

    @abstractmethod
    def update(
        self,
        block: "Block",
        state: dict[str, Any],
        evidence: BlockEvidence,
        *,
        decay: float | None = None,
    ) -> bool | None:
        """Fold evidence into the block's statistics in place.

        Returns:
            ``False`` when a block that should get evidence got none (for example a layer whose
            hooks never fired); the optimizer counts it as ``missing_evidence`` and warns.
            ``None`` or ``True`` otherwise.
        """

    def update_group(
        self,
        blocks: Sequence["Block"],
        states: Sequence[dict[str, Any]],
        evidence: Sequence[BlockEvidence],
        *,
        decay: float | None = None,
    ) -> list[bool | None]:
        """:meth:`update` for several blocks at once (the optimizer feeds every block due at a
        step through one call). The default loops over :meth:`update`; an estimator that can
        batch the work across blocks (one ``torch._foreach_*`` call for all their statistics,
        say) overrides it with the same result.

        Returns:
            What :meth:`update` returned, per block.
        """
        return [self.update(b, s, e, decay=decay) for b, s, e in zip(blocks, states, evidence)]

    @property
    def accumulates(self) -> bool:
        """Whether the estimator implements :meth:`batch_statistics` and :meth:`fold` (its
        statistics accumulate exactly over micro-batches)."""
        return type(self).batch_statistics is not CurvatureEstimator.batch_statistics

    def batch_statistics(
        self, block: "Block", state: dict[str, Any], evidence: BlockEvidence
    ) -> dict[str, Any] | bool | None:
        """The additive statistics of one batch of evidence, without touching ``state``.

        Returns:
            A dict of tensors and numbers (sums over the batch's examples and their counts) such
            that the entrywise sum of the dicts of several micro-batches is the dict of their
            union; ``None`` when the block has nothing to estimate; ``False`` when it should
            have got evidence and got none (see :meth:`update`).

        Raises:
            NotImplementedError: for estimators that do not accumulate (the default).
        """
        raise NotImplementedError(f"estimator {self.name or type(self).__name__!r} does not accumulate micro-batches")

    def fold(
        self, block: "Block", state: dict[str, Any], statistics: dict[str, Any], *, decay: float | None = None
    ) -> None:
        """Normalise summed :meth:`batch_statistics` (of one or several micro-batches) and fold
        them into ``state`` with the averaging rule of :meth:`update` (``decay`` as there)."""
        raise NotImplementedError(f"estimator {self.name or type(self).__name__!r} does not accumulate micro-batches")

    @abstractmethod
    def factors(self, block: "Block", state: dict[str, Any], *, damping: float) -> list[Factor | None] | None:
        """One factor per mode of the block view (``None`` = identity mode), or ``None`` if no
        statistics have been collected yet."""

    def capture(self) -> AbstractContextManager[Any]:
        """Context entered around the sampled backward (for estimators that watch it)."""
        return nullcontext()

    def after_step(
        self,
        blocks: Sequence["Block"],
        states: Sequence[dict[str, Any]],
        *,
        closure: Callable[[], Tensor],
        recorder: "LayerRecorder | None",
    ) -> None:
        """Called after the parameter update when ``evidence.closure`` is set; may call
        ``closure()`` (forward and backward on the same batch at the new parameters)."""

    def check_state(self, block: "Block", state: dict[str, Any]) -> None:
        """Validate a loaded block state (shapes) and raise ``ValueError`` if it does not fit."""


class Inverter(Part):
    r"""Turns a batch of same-size symmetric factors into preconditioning matrices.

    :meth:`invert` receives ``matrices`` of shape ``(b, d, d)``, ``damping`` of shape ``(b,)`` and
    ``order`` of shape ``(b,)`` (the number of modes ``k`` of each factor's block, so that roots
    such as Shampoo's :math:`-1/(2k)` can depend on it), and returns a ``(b, d, d)`` tensor.
    Implementations must not modify their inputs.

    An inverter whose :attr:`produces` is ``"eigenbasis"`` returns a pair ``(vectors, values)``
    of shapes ``(b, d, d)`` and ``(b, d)`` instead; the optimizer wraps each as an
    :class:`~curvkit.operators.EigenBasis`.
    """

    #: What :meth:`invert` returns: ``"matrix"`` (dense ``(b, d, d)``) or ``"eigenbasis"``.
    produces: ClassVar[str] = "matrix"

    #: Whether :meth:`invert` takes ``previous=``: the ``(b, d, d)`` eigenvectors of the same
    #: factors' last refresh (an eigenbasis inverter's), or ``None`` (not passed) at their first
    #: refresh. The optimizer batches factors with and without a previous basis separately, so a
    #: warm-started refresh (SOAP's QR step) gets one for every factor of a batch or for none.
    warm_start: ClassVar[bool] = False

    @abstractmethod
    def invert(self, matrices: Tensor, *, damping: Tensor, order: Tensor) -> Tensor:
        """Invert a batch of factors."""


class Preconditioner(Part):
    r"""Forms the update direction of a block from its buffer and the inverted factors.

    The optimizer calls :meth:`apply_group` once per group of blocks of equal view shape, dtype
    and device (of equal dtype and device only, for a preconditioner that declares
    :attr:`mixed_shapes`); the default loops over :meth:`apply`, and a preconditioner that can
    batch the group (one ``bmm`` over the stacked buffers, say) overrides it.
    """

    #: Per-mode entries this preconditioner can apply -- ``"matrix"`` for dense tensors,
    #: ``"eigenbasis"`` for :class:`~curvkit.operators.EigenBasis`, ``"operator"`` for any
    #: :class:`~curvkit.operators.InverseOperator`; :func:`curvkit.compose` checks the
    #: inverter's :attr:`Inverter.produces` against it when it builds.
    accepts: ClassVar[tuple[str, ...]] = ("matrix", "eigenbasis", "operator")

    #: Whether :meth:`apply_group` takes blocks of different view shapes: the optimizer then
    #: calls it once per dtype, device and kind of block instead of once per view shape (fewer
    #: calls on models of many small layers of different sizes).
    mixed_shapes: ClassVar[bool] = False

    #: Whether :meth:`apply_group` also reads each block's estimator statistics: the optimizer
    #: then passes ``statistics=[estimator state of each block]`` (EKFAC's per-coordinate
    #: scalings), and :func:`curvkit.compose` calls :meth:`check_estimator` when it builds.
    reads_statistics: ClassVar[bool] = False

    def check_estimator(self, estimator: "CurvatureEstimator") -> None:
        """Raise ``ValueError`` if ``estimator``'s statistics are not what this preconditioner
        reads (called by :func:`curvkit.compose` when :attr:`reads_statistics` is set)."""

    def describe(self, block: "Block") -> str:
        """One line saying what this preconditioner does to ``block`` (a column of
        :meth:`curvkit.CurvatureOptimizer.block_plan`); the registered name by default."""
        return self.name or type(self).__name__

    #: Whether :meth:`~curvkit.Preconditioner.apply_group` is pure tensor code that
    #: :func:`torch.compile` traces into one graph (no host reads, no Python values that change
    #: from step to step): the optimizer's ``compile_update=True`` path computes the direction
    #: inside its compiled graph, and refuses preconditioners that do not declare it.
    traceable: ClassVar[bool] = False

    def apply_group(
        self,
        blocks: Sequence["Block"],
        states: Sequence[dict[str, Any]],
        directions: Sequence[Tensor],
        inverses: Sequence[Sequence[Any] | None],
        *,
        gradients: Sequence[Tensor],
    ) -> list[Tensor]:
        """Precondition a group of blocks (of one view shape unless :attr:`mixed_shapes`); by default
        one :meth:`apply` per block."""
        return [
            self.apply(b, s, d, inv, gradient=g)
            for b, s, d, inv, g in zip(blocks, states, directions, inverses, gradients)
        ]

    def init_state(self, block: "Block") -> dict[str, Any]:
        """Per-block state (for example grafting statistics); empty by default."""
        return {}

    @abstractmethod
    def apply(
        self,
        block: "Block",
        state: dict[str, Any],
        direction: Tensor,
        inverses: Sequence[Tensor | None] | None,
        *,
        gradient: Tensor,
    ) -> Tensor:
        """Precondition ``direction`` (view-shaped, usually the momentum buffer).

        Args:
            block: the block.
            state: this preconditioner's per-block state.
            direction: the buffer to precondition, in the block's view shape.
            inverses: one matrix per mode (``None`` = identity), or ``None`` when the block has
                no inverses yet (the preconditioner should then return a sensible fallback,
                usually ``direction`` itself).
            gradient: the current minibatch gradient in view shape (for grafting).
        """
