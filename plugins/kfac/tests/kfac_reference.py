"""Brute-force references for the kfac tests: explicit loops over examples and positions, float64.

Nothing here uses the plugin's code: patches are cut out of an explicitly padded input by index
arithmetic (and checked against the layer's own output), and per-example output gradients come
from running each example through the layer on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def deterministic_loss(targets: Tensor):
    """A "sampled" loss with fixed targets: ``L = (1/m) sum_n l_n``, ``l_n = sum sin(out_n) * T_n``.

    Used as the callable loss of ``update_curvature`` so that the factors are deterministic.
    """

    def loss(outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return (torch.sin(outputs) * targets).sum() / outputs.shape[0]

    return loss


def per_example_output_grads(layer: nn.Module, x: Tensor, targets: Tensor) -> list[Tensor]:
    """``d l_n / d s_n`` for each example, each from a forward of that example alone."""
    grads = []
    for n in range(x.shape[0]):
        out = layer(x[n : n + 1])
        (g,) = torch.autograd.grad((torch.sin(out) * targets[n : n + 1]).sum(), out)
        grads.append(g[0].detach())
    return grads


def linear_factors(layer: nn.Linear, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """A and G of a Linear layer: every leading index of ``x`` is an example."""
    grads = per_example_output_grads(layer, x, targets)
    d_in = layer.in_features + (layer.bias is not None)
    A = torch.zeros(d_in, d_in, dtype=torch.float64)
    G = torch.zeros(layer.out_features, layer.out_features, dtype=torch.float64)
    rows = 0
    for n in range(x.shape[0]):
        a_n = x[n].reshape(-1, layer.in_features)
        g_n = grads[n].reshape(-1, layer.out_features)
        for r in range(a_n.shape[0]):
            a = a_n[r]
            if layer.bias is not None:
                a = torch.cat([a, torch.ones(1, dtype=a.dtype)])
            A += torch.outer(a, a)
            G += torch.outer(g_n[r], g_n[r])
            rows += 1
    return A / rows, G / rows


def _padded(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``x`` (C, H, W) padded as ``conv`` pads it."""
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    if conv.padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        top, bottom, left, right = th // 2, th - th // 2, tw // 2, tw - tw // 2
    elif conv.padding == "valid":
        top = bottom = left = right = 0
    else:
        top = bottom = conv.padding[0]
        left = right = conv.padding[1]
    c, h, w = x.shape
    if conv.padding_mode == "zeros":
        out = torch.zeros(c, h + top + bottom, w + left + right, dtype=x.dtype)
        out[:, top : top + h, left : left + w] = x
        return out
    return F.pad(x.unsqueeze(0), (left, right, top, bottom), mode=conv.padding_mode)[0]


def conv2d_factors(conv: nn.Conv2d, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """A and G of a Conv2d layer by the KFC rule, with a loop over examples and positions.

    ``A = (1/N) sum_{n,p} a a^T`` and ``G = (1/(N P)) sum_{n,p} g g^T``; every patch is checked to
    reproduce the layer's output at its position.
    """
    grads = per_example_output_grads(conv, x, targets)
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    weight = conv.weight.detach().reshape(conv.out_channels, -1)
    d_in = weight.shape[1] + (conv.bias is not None)
    A = torch.zeros(d_in, d_in, dtype=torch.float64)
    G = torch.zeros(conv.out_channels, conv.out_channels, dtype=torch.float64)
    positions = 0
    for n in range(x.shape[0]):
        xp = _padded(conv, x[n])
        out = conv(x[n : n + 1])[0].detach()
        g_n = grads[n]
        ho, wo = out.shape[1:]
        positions = ho * wo
        for i in range(ho):
            for j in range(wo):
                patch = xp[:, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw]
                a = patch.reshape(-1)
                s = weight @ a + (conv.bias.detach() if conv.bias is not None else 0.0)
                assert torch.allclose(s, out[:, i, j], atol=1e-10), "reference patch does not reproduce the conv"
                if conv.bias is not None:
                    a = torch.cat([a, torch.ones(1, dtype=a.dtype)])
                A += torch.outer(a, a)
                G += torch.outer(g_n[:, i, j], g_n[:, i, j])
    N = x.shape[0]
    return A / N, G / (N * positions)
