"""The built-in dataset: coloured shapes on dark backgrounds, generated from a seed.

Six kinds (the label), each with a random size, position and colour, drawn from
signed distance fields so edges are antialiased. No files, no network: every
command runs offline on a fresh machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from vqgen.core.runtime.errors import VQGenError

SHAPE_NAMES = ("circle", "square", "triangle", "cross", "ring", "diamond")
MIN_SIZE = 8
_CHUNK = 4096  # images rendered at once: bounds the float buffers, few enough ops to stay fast


# Signed distance to each shape's outline, in units of the shape's radius:
# negative inside, positive outside. u grows rightwards, v downwards.
def _circle(u: Tensor, v: Tensor) -> Tensor:
    return torch.sqrt(u * u + v * v) - 1.0


def _square(u: Tensor, v: Tensor) -> Tensor:
    return torch.maximum(u.abs(), v.abs()) - 0.8


def _triangle(u: Tensor, v: Tensor) -> Tensor:
    side = (math.sqrt(3.0) * u.abs() - (v + 0.95)) / 2.0  # the two slanted edges, apex at v = -0.95
    return torch.maximum(side, v - 0.75)


def _cross(u: Tensor, v: Tensor) -> Tensor:
    upright = torch.maximum(u.abs() - 0.3, v.abs() - 0.95)
    level = torch.maximum(u.abs() - 0.95, v.abs() - 0.3)
    return torch.minimum(upright, level)


def _ring(u: Tensor, v: Tensor) -> Tensor:
    return (torch.sqrt(u * u + v * v) - 0.775).abs() - 0.225


def _diamond(u: Tensor, v: Tensor) -> Tensor:
    return (u.abs() + v.abs() - 1.0) / math.sqrt(2.0)


_DISTANCES: tuple[Callable[[Tensor, Tensor], Tensor], ...] = (_circle, _square, _triangle, _cross, _ring, _diamond)


def hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """(n,), (n,), (n,) in [0, 1] -> (n, 3) RGB in [0, 1]."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + h[:, None] * 6.0) % 6.0  # (n, 3)
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return v[:, None] * (1.0 - s[:, None] * ramp)


def _render(distance: Callable[[Tensor, Tensor], Tensor], cx: Tensor, cy: Tensor, radius: Tensor,
            fg: Tensor, bg: Tensor, tilt: Tensor, size: int) -> Tensor:
    """Images of one kind: per-image parameters (b,), colours (b, 3) -> uint8 (b, 3, s, s)."""
    pos = torch.arange(size, dtype=torch.float32) + 0.5  # pixel centres
    r = radius[:, None, None]
    u = (pos[None, None, :] - cx[:, None, None]) / r  # (b, 1, s)
    v = (pos[None, :, None] - cy[:, None, None]) / r  # (b, s, 1)
    alpha = (0.5 - distance(u, v) * r).clamp_(0.0, 1.0)[:, None]  # (b, 1, s, s) pixel coverage
    shade = 1.0 + (pos / size - 0.5)[None, None, :, None] * tilt[:, None, None, None]  # (b, 1, s, 1)
    background = (bg[:, :, None, None] * shade).clamp_(0.0, 1.0)  # (b, 3, s, 1)
    image = torch.lerp(background, fg[:, :, None, None], alpha)  # (b, 3, s, s)
    return image.mul_(255.0).add_(0.5).to(torch.uint8)  # + 0.5 then truncate: round half up


def make_shapes(n: int, seed: int, size: int = 32) -> tuple[Tensor, Tensor, list[str]]:
    """`n` images of coloured shapes: uint8 (n, 3, size, size), int64 labels (n,), class names.

    Deterministic in `seed`; the kinds are balanced (each appears n // 6 or n // 6 + 1 times).
    """
    if n < 1:
        raise VQGenError(f"number of shape images must be >= 1, got {n}")
    if size < MIN_SIZE:
        raise VQGenError(f"shape image size must be >= {MIN_SIZE}, got {size}")
    g = torch.Generator().manual_seed(seed)
    kinds = len(SHAPE_NAMES)
    labels = (torch.arange(n) % kinds)[torch.randperm(n, generator=g)]

    def uniform(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(n, generator=g)

    radius = size * uniform(0.2, 0.42)  # in pixels; every shape fits inside its radius
    room = (size - 2.0 * (radius + 1.0)).clamp(min=0.0)  # centres that keep the shape off the border
    cx = radius + 1.0 + room * torch.rand(n, generator=g)
    cy = radius + 1.0 + room * torch.rand(n, generator=g)
    fg = hsv_to_rgb(uniform(0.0, 1.0), uniform(0.55, 1.0), uniform(0.75, 1.0))  # bright, saturated
    bg = hsv_to_rgb(uniform(0.0, 1.0), uniform(0.0, 0.6), uniform(0.06, 0.28))  # dark, muted
    tilt = uniform(-0.5, 0.5)

    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for kind, distance in enumerate(_DISTANCES):
        for idx in torch.nonzero(labels == kind)[:, 0].split(_CHUNK):
            images[idx] = _render(distance, cx[idx], cy[idx], radius[idx], fg[idx], bg[idx], tilt[idx], size)
    return images, labels, list(SHAPE_NAMES)
