r"""A GENERATED stand-in for the CURVES data set: 28x28 anti-aliased images of random smooth curves.

The original CURVES set (Hinton & Salakhutdinov, 2006) holds 28x28 images of curves generated
from three random points in the plane; the autoencoder's 6-unit code matches those six numbers.
It is not available offline, so this module generates images in the same spirit (this is *not*
the original data, and every output that uses it says "generated"):

1. draw three points :math:`p_0, p_m, p_2` uniformly in the square ``[margin, 28 - margin]^2``
   (pixel units);
2. the curve is the quadratic Bezier curve through :math:`p_0` and :math:`p_2` that passes
   through :math:`p_m` at :math:`t = 1/2`, i.e. with control point
   :math:`c = 2 p_m - (p_0 + p_2) / 2` and :math:`b(t) = (1-t)^2 p_0 + 2t(1-t) c + t^2 p_2`;
3. it is rendered with anti-aliasing: a pixel whose centre lies at distance :math:`d` from the
   (densely sampled) curve gets intensity :math:`\mathrm{clip}(1 + w/2 - d, 0, 1)`, a stroke of
   width :math:`w` with a one-pixel linear edge, so intensities lie in [0, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["curve_points", "generate_curves", "render_curves"]

SIZE = 28


def curve_points(anchors: Tensor, samples: int = 160) -> Tensor:
    """Points along the quadratic curve through each triple of anchors.

    Args:
        anchors: ``(n, 3, 2)`` points :math:`p_0, p_m, p_2` (x, y in pixel units).
        samples: points per curve, uniform in :math:`t \\in [0, 1]`.

    Returns:
        ``(n, samples, 2)`` points; ``t = 0, 1/2, 1`` hit the three anchors exactly.
    """
    if anchors.dim() != 3 or anchors.shape[1:] != (3, 2):
        raise ValueError(f"anchors must have shape (n, 3, 2), got {tuple(anchors.shape)}")
    if samples < 3 or samples % 2 == 0:
        raise ValueError(f"samples must be an odd integer >= 3 (so t = 1/2 is sampled), got {samples}")
    p0, pm, p2 = anchors[:, 0], anchors[:, 1], anchors[:, 2]
    c = 2 * pm - (p0 + p2) / 2
    t = torch.linspace(0.0, 1.0, samples, dtype=anchors.dtype)[None, :, None]
    return (1 - t) ** 2 * p0[:, None] + 2 * t * (1 - t) * c[:, None] + t**2 * p2[:, None]


def render_curves(points: Tensor, *, width: float = 1.0, chunk: int = 128) -> Tensor:
    """Anti-aliased images ``(n, 28 * 28)`` in [0, 1] of curves given as dense point lists."""
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    centres = torch.arange(SIZE, dtype=points.dtype) + 0.5
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")
    pix = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)  # (784, 2), row-major (y, x)
    images = []
    for start in range(0, points.shape[0], chunk):
        pts = points[start:start + chunk]
        dist = torch.cdist(pix[None].expand(pts.shape[0], -1, -1), pts).amin(dim=2)
        images.append((1.0 + width / 2 - dist).clamp_(0.0, 1.0))
    return torch.cat(images, dim=0)


def generate_curves(n: int, *, seed: int = 0, margin: float = 3.0, width: float = 1.0) -> Tensor:
    """``n`` generated curve images, flattened to 784 values in [0, 1] (float32).

    The same ``seed`` always gives the same images.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= margin < SIZE / 2:
        raise ValueError(f"margin must be in [0, {SIZE / 2}), got {margin}")
    gen = torch.Generator().manual_seed(seed)
    anchors = margin + (SIZE - 2 * margin) * torch.rand(n, 3, 2, generator=gen, dtype=torch.float64)
    points = curve_points(anchors, samples=161)
    return render_curves(points, width=width).to(torch.float32)
