r"""The ``kfac`` estimator: Kronecker-factored approximate curvature (Martens & Grosse, 2015).

For a layer :math:`s = W a` (weight and bias viewed as one ``(out, in_flat + 1)`` matrix by
:class:`curvkit.HomogeneousLayout`, the bias as the last, homogeneous column) KFAC approximates
the Fisher block by :math:`G \otimes A` (row-major ``vec`` of the view), with

.. math::
    A = E[a a^\top], \qquad G = E[(m\, \partial L/\partial s)(m\, \partial L/\partial s)^\top],

:math:`a` the layer input with a 1 appended when the layer has a bias, and
:math:`\partial L/\partial s` the gradient of the batch-mean loss with respect to the layer
output, rescaled to per-example scale by the batch size :math:`m`. By default the loss is the one
whose targets are *sampled* from the model (true Fisher), taken by
:meth:`curvkit.CurvatureOptimizer.update_curvature`; ``evidence="empirical"`` uses the gradients
of the user's own backward pass instead (empirical Fisher). See :mod:`curvkit_kfac.layers` for
how rows, examples and convolutions (the KFC rule) are counted.

Statistics are averaged by an EMA, :math:`S \leftarrow \beta S + (1 - \beta) \hat S` (the first
update sets :math:`S = \hat S`). With the optimizer's damping :math:`\lambda` the factors handed to
the inverter are :math:`A + \sqrt\lambda I` and :math:`G + \sqrt\lambda I`; with ``pi_damping``
the split is :math:`A + \pi\sqrt\lambda I`, :math:`G + \sqrt\lambda/\pi\, I` with

.. math:: \pi = \sqrt{\frac{\operatorname{tr} A / \dim A}{\operatorname{tr} G / \dim G}}

(kept as a tensor: no host synchronisation). Mode 0 of the view gets :math:`G`, mode 1 gets
:math:`A`, so the core ``kronecker_mode`` preconditioner with a power-1 inverter forms the KFAC
direction :math:`(G + d_G I)^{-1} M (A + d_A I)^{-1}` on the momentum buffer :math:`M`.

``nn.Embedding`` layers are factored too: the input of a row is the one-hot vector of its token,
so :math:`A = \mathrm{diag}(\text{token counts}) / m` (kept as its diagonal) sits on the
vocabulary mode (mode 0 of the ``(num_embeddings, dim)`` weight) and :math:`G` on the ``dim``
mode; a vocabulary larger than ``max_factor_dim`` is left unfactored.

The block plan is :func:`curvkit_kfac.planning.plan_layers` (shared with ``kbfgs``): a layer's
weight and bias form one block even when they sit in different param groups, a weight tied
across several layers gets one block whose statistics come from every use, and
``nn.MultiheadAttention`` (whose forward bypasses ``out_proj.forward``) is planned as a fallback.
Parameters of layers kfac does not know (norm layers, attention, loose parameters, grouped
convolutions) follow the ``fallback`` policy: ``"momentum"`` gives them a block with every mode
unfactored (the plain momentum direction), ``"error"`` refuses them. A mode larger than
``max_factor_dim`` is left unfactored (identity); the factored side then gets the full damping
:math:`\lambda`, so that :math:`(G + \lambda I) \otimes I = G \otimes I + \lambda I`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from curvkit import (
    FALLBACK_MOMENTUM,
    Block,
    BlockEvidence,
    CurvatureEstimator,
    EvidenceSpec,
    Factor,
    PartConfig,
    Source,
    register,
    statistics_dtype,
)
from curvkit.config import check_choice, check_in_unit_interval, check_positive
from curvkit.contractions import add_gram_

from .layers import LAYER_KINDS, layer_rows
from .planning import layer_modules, plan_layers

__all__ = ["FALLBACK_KIND", "KFACConfig", "KFACEstimator"]

#: ``Block.kind`` of the parameters that take the plain momentum direction.
FALLBACK_KIND = FALLBACK_MOMENTUM


@dataclass(frozen=True)
class KFACConfig(PartConfig):
    """Options of :class:`KFACEstimator`.

    Attributes:
        stat_decay: EMA decay :math:`\\beta` of ``A`` and ``G`` (0.9 as in the paper).
        evidence: ``"sampled"`` (targets drawn from the model: true Fisher) or ``"empirical"``
            (the gradients of your own backward pass with the data labels: empirical Fisher).
        pi_damping: split the damping between ``A`` and ``G`` by the trace ratio :math:`\\pi`.
        fallback: what parameters of unknown layers get: ``"momentum"`` (plain momentum
            direction) or ``"error"`` (refuse them at construction).
        gradient_scale: the factor :math:`c` that brings output gradients to per-example scale;
            ``None`` uses the batch size :math:`m` (right for batch-mean losses, the default
            reduction of every sampled loss with ``(N, C)`` or ``(N, D)`` outputs); give ``1.0``
            for a loss summed over the batch, and ``N * L`` for a cross-entropy averaged over
            ``(N, C, L)`` outputs.
    """

    stat_decay: float = 0.9
    evidence: str = "sampled"
    pi_damping: bool = False
    fallback: str = "momentum"
    gradient_scale: float | None = None

    def __post_init__(self) -> None:
        check_in_unit_interval("stat_decay", self.stat_decay)
        check_choice("evidence", self.evidence, ("sampled", "empirical"))
        if not isinstance(self.pi_damping, bool):
            raise ValueError(f"pi_damping must be a bool (True or False), got {self.pi_damping!r}")
        check_choice("fallback", self.fallback, ("momentum", "error"))
        if self.gradient_scale is not None:
            check_positive("gradient_scale", self.gradient_scale)


@register("estimator", "kfac")
class KFACEstimator(CurvatureEstimator):
    """Kronecker factors ``A`` (inputs) and ``G`` (output gradients) of Linear and Conv2d layers."""

    Config = KFACConfig

    @property
    def evidence(self) -> EvidenceSpec:
        source = Source.SAMPLED if self.config.evidence == "sampled" else Source.MINIBATCH
        # KFAC reads layer inputs and output gradients only: no layer outputs, and the sampled
        # backward may stop at the layer outputs (no weight-gradient products)
        return EvidenceSpec(source=source, layer_io=True, layer_outputs=False, parameter_gradients=False)

    # ------------------------------------------------------------------ plan
    def plan(
        self,
        named_params: Sequence[tuple[str, nn.Parameter, int]],
        *,
        model: nn.Module | None,
        max_factor_dim: int | None,
    ) -> list[Block]:
        """One ``(out, in_flat [+ 1])`` block per known layer (weight and bias together even when
        they sit in different param groups; a tied weight gets one block fed by every use),
        fallback blocks for the rest (see :mod:`curvkit_kfac.planning`)."""
        return plan_layers(
            named_params, model=model, max_factor_dim=max_factor_dim, kinds=LAYER_KINDS, method="kfac",
            fallback=self.config.fallback, fallback_option="fallback", tied="share",
        )

    # ------------------------------------------------------------------ statistics
    def init_state(self, block: Block) -> dict[str, Any]:
        """Zero ``A`` (``d_in x d_in``) and ``G`` (``d_out x d_out``), ``None`` on unfactored modes;
        fallback blocks keep only an update counter."""
        if block.module is None:
            return {"updates": 0}
        ref = block.params[0]
        dtype = statistics_dtype(ref.dtype)
        if _is_embedding(block):  # view (vocabulary, dim): A = diag(counts) on mode 0, G on mode 1
            (vocab, dim), (f_vocab, f_dim) = block.shape, block.factored
            return {
                "A": torch.zeros(vocab, dtype=dtype, device=ref.device) if f_vocab else None,
                "G": torch.zeros(dim, dim, dtype=dtype, device=ref.device) if f_dim else None,
                "updates": 0,
            }
        (d_out, d_in), (f_out, f_in) = block.shape, block.factored
        return {
            "A": torch.zeros(d_in, d_in, dtype=dtype, device=ref.device) if f_in else None,
            "G": torch.zeros(d_out, d_out, dtype=dtype, device=ref.device) if f_out else None,
            "updates": 0,
        }

    def check_state(self, block: Block, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` if a loaded state's factors do not fit the block's view."""
        if block.module is None:
            if "updates" not in state:
                raise ValueError(f"block {block.name!r}: saved state is not a kfac fallback state")
            return
        if _is_embedding(block):
            modes = (("A", block.shape[0], block.factored[0], 1), ("G", block.shape[1], block.factored[1], 2))
        else:
            modes = (("G", block.shape[0], block.factored[0], 2), ("A", block.shape[1], block.factored[1], 2))
        for key, d, f, rank in modes:
            if key not in state:
                raise ValueError(f"block {block.name!r}: saved state has no kfac factor {key!r}")
            s = state[key]
            if (s is None) == f or (s is not None and tuple(s.shape) != (d,) * rank):
                got = None if s is None else tuple(s.shape)
                raise ValueError(f"block {block.name!r}: saved factor {key} of shape {got} does not fit size {d}")

    @torch.no_grad()
    def update(
        self,
        block: Block,
        state: dict[str, Any],
        evidence: BlockEvidence,
        *,
        decay: float | None = None,
    ) -> bool | None:
        r"""Fold the recorded calls of the block's layer into ``A`` and ``G``.

        With :math:`n` examples, :math:`r` rows and scale :math:`c` (see the module docstring),
        :math:`\hat A = \frac1n \sum a a^\top` and :math:`\hat G = \frac{c^2}{r} \sum g g^\top`, then
        :math:`S \leftarrow \text{decay}\, S + (1 - \text{decay})\, \hat S` (``decay=None``: 0 on the
        first update, ``stat_decay`` after). Reads the output gradients of the ``"sampled"`` or
        ``"minibatch"`` phase, as ``evidence`` says (every use of a tied weight contributes).
        It is :meth:`batch_statistics` followed by :meth:`fold`.

        Returns:
            ``False`` when the block's layer got no complete record (input and output gradient)
            in this statistics step -- its forward never ran, ran under ``torch.no_grad``, was
            bypassed (a layer whose owner calls its weight directly) or hooks did not fire (some
            ``torch.compile`` graphs); the statistics are left as they are and the optimizer
            counts the block's ``missing_evidence``. ``None`` otherwise.
        """
        stats = self.batch_statistics(block, state, evidence)
        if stats is None or stats is False:
            return stats
        self.fold(block, state, stats, decay=decay)
        return None

    @torch.no_grad()
    def batch_statistics(self, block: Block, state: dict[str, Any], evidence: BlockEvidence) -> dict[str, Any] | bool | None:
        r"""The sums of one batch: ``A`` :math:`= \sum a a^\top` over its rows (with the
        homogeneous 1), ``G`` :math:`= \sum g g^\top` and the counts ``examples``, ``rows``.

        With sampled evidence each micro-batch's output gradients are brought to per-example
        scale by its own :math:`c` (the sampled loss is that micro-batch's mean) before they are
        summed. With empirical evidence ``G`` stays unscaled and ``batch`` counts the examples:
        :meth:`fold` scales by :math:`c` = the examples of *all* micro-batches, since a loop that
        accumulates gradients divides each micro-batch's loss by their number (so that the
        accumulated gradient is the mean over the whole batch), as Lightning and Hugging Face's
        ``Trainer`` do; give ``gradient_scale`` otherwise.
        """
        if block.module is None:
            return None
        if evidence.layer is None:
            raise RuntimeError("kfac needs layer records: build the optimizer with model=<your nn.Module>")
        A, G = state["A"], state["G"]
        if A is None and G is None:  # both modes unfactored: nothing to estimate
            return None
        sampled = self.config.evidence == "sampled"
        calls = self._calls(block, evidence)
        if not calls:
            return False
        dtype = (A if A is not None else G).dtype
        scale = self._gradient_scale(evidence, calls[0][1])
        out: dict[str, Any] = {"batch": 0.0 if sampled else scale}
        g_weight = scale * scale if sampled else 1.0
        if _is_embedding(block):
            counts = None if A is None else torch.zeros_like(A)
            g_sum = None if G is None else torch.zeros_like(G)
            rows = 0
            for _, ids, grad in calls:
                ids = ids.reshape(-1)
                g = grad.reshape(-1, grad.shape[-1]).to(dtype)
                rows += ids.shape[0]
                if counts is not None:
                    counts.index_add_(0, ids, torch.ones(ids.shape[0], dtype=dtype, device=ids.device))
                if g_sum is not None:
                    add_gram_(g_sum, g, alpha=g_weight)
            out.update(A=counts, G=g_sum, examples=rows, rows=rows)
            return out
        has_bias = len(block.params) == 2
        # the first call writes every entry of the sums (``beta=0``: no zero fill, no read of the
        # fresh buffer's content); later calls (a tied weight) add to them
        a_sum = None if A is None else torch.empty_like(A)
        g_sum = None if G is None else torch.empty_like(G)
        examples = rows = 0
        for k, (module, inputs, grad) in enumerate(calls):
            r = layer_rows(module, inputs.to(dtype) if inputs.is_floating_point() else inputs, grad.to(dtype))
            examples += r.examples
            rows += r.gradients.shape[0]
            beta = 0.0 if k == 0 else 1.0
            if a_sum is not None:
                a, d = r.activations, r.activations.shape[1]
                if k == 0 and d + has_bias != a_sum.shape[0]:  # rows the Gram would not write
                    a_sum.zero_()
                    beta = 1.0
                add_gram_(a_sum[:d, :d], a, beta=beta)
                if has_bias:  # the homogeneous 1: column sums and the row count, without a copy of a
                    col = a.sum(0)
                    if beta == 0.0:
                        a_sum[:d, d] = col
                        a_sum[d, :d] = col
                        a_sum[d, d] = a.shape[0]
                    else:
                        a_sum[:d, d] += col
                        a_sum[d, :d] += col
                        a_sum[d, d] += a.shape[0]
            if g_sum is not None:
                add_gram_(g_sum, r.gradients, alpha=g_weight, beta=0.0 if k == 0 else 1.0)
        out.update(A=a_sum, G=g_sum, examples=examples, rows=rows)
        return out

    def _calls(self, block: Block, evidence: BlockEvidence) -> list[tuple[nn.Module, Tensor, Tensor]]:
        """``(module, input, output gradient)`` of every recorded call of the block's layer(s) with a
        gradient in this estimator's phase (every use of a tied weight)."""
        phase = "sampled" if self.config.evidence == "sampled" else "minibatch"
        calls = []
        for module in layer_modules(block):
            record = evidence.layer.records.get(module)  # type: ignore[union-attr]
            if record is not None:
                calls += [(module, a, g) for a, g in zip(record.inputs, record.grads(phase)) if g is not None]
        return calls

    @torch.no_grad()
    def fold(self, block: Block, state: dict[str, Any], statistics: dict[str, Any], *, decay: float | None = None) -> None:
        r""":math:`\hat A = A_\Sigma / n`, :math:`\hat G = c^2 G_\Sigma / r` (``c`` = 1 for sampled
        sums, already scaled; else ``gradient_scale`` or the summed ``batch``), folded by the EMA
        (``decay=None``: 0 on the first update, ``stat_decay`` after)."""
        A, G = state["A"], state["G"]
        if decay is None:
            decay = 0.0 if state["updates"] == 0 else self.config.stat_decay
        weight = 1.0 - decay
        c2 = 1.0
        if self.config.evidence != "sampled":
            c = float(self.config.gradient_scale) if self.config.gradient_scale is not None else float(statistics["batch"])
            c2 = c * c
        if A is not None:
            denominator = statistics["rows"] if _is_embedding(block) else statistics["examples"]
            A.mul_(decay).add_(statistics["A"], alpha=weight / denominator)
        if G is not None:
            G.mul_(decay).add_(statistics["G"], alpha=weight * c2 / statistics["rows"])
        state["updates"] += 1

    def _gradient_scale(self, evidence: BlockEvidence, first_input: Tensor) -> float:
        """``gradient_scale``, else the batch size the optimizer reports, else the layer's dim 0."""
        if self.config.gradient_scale is not None:
            return float(self.config.gradient_scale)
        if evidence.batch_size is not None:
            return float(evidence.batch_size)
        return float(first_input.shape[0]) if first_input.dim() > 1 else 1.0

    def factors(self, block: Block, state: dict[str, Any], *, damping: float) -> list[Factor | None] | None:
        r"""``[Factor(G, d_G), Factor(A, d_A)]`` with :math:`d_A = d_G = \sqrt\lambda` (or the
        :math:`\pi` split); ``None`` for fallback blocks and before the first update."""
        if block.module is None or state["updates"] == 0:
            return None
        A, G = state["A"], state["G"]
        if _is_embedding(block):  # modes (vocabulary, dim): the diagonal A first
            A = None if A is None else torch.diag(A)
            if A is None or G is None:
                return [None if A is None else Factor(A, damping), None if G is None else Factor(G, damping)]
            g_factor, a_factor = self._split(A, G, damping)
            return [a_factor, g_factor]
        if A is None or G is None:
            return [None if G is None else Factor(G, damping), None if A is None else Factor(A, damping)]
        g_factor, a_factor = self._split(A, G, damping)
        return [g_factor, a_factor]

    def _split(self, A: Tensor, G: Tensor, damping: float) -> tuple[Factor, Factor]:
        """``(Factor(G, d_G), Factor(A, d_A))`` with the damping split (module docstring)."""
        root = math.sqrt(damping)
        if not self.config.pi_damping:
            return Factor(G, root), Factor(A, root)
        mean_a = torch.trace(A) / A.shape[0]
        mean_g = torch.trace(G) / G.shape[0]
        usable = (mean_a > 0) & (mean_g > 0)
        tiny = torch.finfo(A.dtype).tiny
        pi = torch.where(usable, torch.sqrt(mean_a.clamp_min(tiny) / mean_g.clamp_min(tiny)), torch.ones_like(mean_a))
        return Factor(G, root / pi), Factor(A, root * pi)


def _is_embedding(block: Block) -> bool:
    return isinstance(block.module, nn.Embedding)
