r"""Per-layer rows of KFAC: the activations :math:`a` and output gradients :math:`g` of one call.

KFAC approximates the Fisher block of a layer :math:`s = W a` (bias folded into :math:`W` as a last
column, with a 1 appended to :math:`a`) by a Kronecker product :math:`G \otimes A` with

.. math::
    A = \frac{1}{n} \sum_{\text{rows}} a a^\top, \qquad
    G = \frac{1}{r} \sum_{\text{rows}} (c\, g)(c\, g)^\top,

where :math:`g = \partial L / \partial s` and :math:`c` rescales the gradient of a batch-mean
loss to per-example scale (:math:`c = m`, the batch size). This module turns one recorded call
of a layer into its *rows* (one :math:`a` and one :math:`g` per row) and says how many examples
:math:`n` and rows :math:`r` it contributes:

``nn.Linear``
    input ``(..., in)``, output gradient ``(..., out)``. Every leading index is an example (extra
    leading dimensions, such as a sequence axis, count as more examples), so :math:`n = r`.
``nn.Conv2d`` (the KFC rule of Grosse & Martens, 2016)
    the rows are the receptive-field patches (``torch.nn.functional.unfold``) and the output
    gradients at each spatial position; with :math:`N` examples and :math:`P` positions,
    :math:`n = N` and :math:`r = N P`: :math:`A` is *summed* over positions and averaged over
    examples, :math:`G` is averaged over examples and positions. Stride, padding (numbers,
    ``"same"``, ``"valid"``, and every ``padding_mode``) and dilation are supported; grouped
    convolutions are not (their weight is block-diagonal over groups, which one Kronecker
    product of the ``(out, in/groups * kh * kw)`` view does not describe).

A layer called several times in one forward pass contributes the rows and examples of every call
(the calls are treated as more examples).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from .planning import LayerKind

__all__ = ["LAYER_KINDS", "LayerRows", "SUPPORTED", "conv2d_patches", "layer_rows", "unsupported_reason"]

#: Layer types with Kronecker factors.
SUPPORTED: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.Embedding)


@dataclass
class LayerRows:
    """The rows of one recorded call.

    Attributes:
        activations: ``(r, in_flat)`` layer inputs (patches for convolutions), without the
            homogeneous 1.
        gradients: ``(r, out)`` gradients of the loss with respect to the layer outputs.
        examples: the number of examples :math:`n` the call contributes.
    """

    activations: Tensor
    gradients: Tensor
    examples: int


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` has no Kronecker factors (``None`` if it has them)."""
    if not isinstance(module, SUPPORTED):
        return f"{type(module).__name__} is not a Linear, Conv2d or Embedding layer"
    return _grouped(module) or _embedding(module)


def _grouped(module: nn.Module) -> str | None:
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"Conv2d with groups={module.groups} (kfac factors groups=1 convolutions only)"
    return None


def _embedding(module: nn.Module) -> str | None:
    if isinstance(module, nn.Embedding) and (module.scale_grad_by_freq or module.sparse):
        return "Embedding with scale_grad_by_freq or sparse gradients (kfac needs the plain dense gradient)"
    return None


#: The layer kinds kfac plans (:func:`curvkit_kfac.planning.plan_layers`).
LAYER_KINDS = (
    LayerKind((nn.Linear,), "Linear"),
    LayerKind((nn.Conv2d,), "Conv2d", detail=", KFC patches", unsupported=_grouped),
    LayerKind((nn.Embedding,), "Embedding", factors=("A = diag(counts)", "G"), axes=("vocabulary", "dim"),
              unsupported=_embedding),
)


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """The (left, right, top, bottom) padding ``conv`` applies, as for :func:`F.pad`."""
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        sides = []
        for k, d in ((kw, dw), (kh, dh)):
            total = d * (k - 1)
            sides += [total // 2, total - total // 2]
        return (sides[0], sides[1], sides[2], sides[3])
    ph, pw = conv.padding  # type: ignore[misc]
    return (pw, pw, ph, ph)


def conv2d_patches(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """The receptive-field patches of ``x`` (``(N, C, H, W)``) as ``(N, P, C * kh * kw)``.

    The patch entries are ordered ``(C, kh, kw)`` like the flattened weight
    ``conv.weight.reshape(out, -1)``, so ``patches @ W_flat.T + bias`` is the convolution's output
    at each of the ``P`` positions (row-major over the output height and width).
    """
    pad = _conv_padding(conv)
    if any(pad):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pad, mode=mode)
    patches = F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    return patches.transpose(1, 2)


def layer_rows(module: nn.Module, inputs: Tensor, output_grad: Tensor) -> LayerRows:
    """The rows of one call of a supported layer (see the module docstring for the rules)."""
    if isinstance(module, nn.Linear):
        a = inputs.reshape(-1, inputs.shape[-1])
        g = output_grad.reshape(-1, output_grad.shape[-1])
        return LayerRows(a, g, a.shape[0])
    if isinstance(module, nn.Conv2d):
        if inputs.dim() == 3:  # an unbatched (C, H, W) call
            inputs, output_grad = inputs.unsqueeze(0), output_grad.unsqueeze(0)
        patches = conv2d_patches(module, inputs)
        n = inputs.shape[0]
        a = patches.reshape(-1, patches.shape[-1])
        g = output_grad.flatten(2).transpose(1, 2).reshape(-1, output_grad.shape[1])
        return LayerRows(a, g, n)
    raise ValueError(f"kfac has no rows for {type(module).__name__}")
