"""Editing with any mask: which codes a pixel mask hides, and how a canvas larger than the trained grid is
filled, one window of the trained size at a time.

A code stands for a `downsample` x `downsample` cell of pixels; a code is drawn again when any pixel of its
cell is masked (so a one-pixel mask redraws one code, and a box hides every code it touches). Kept codes are
never changed: `Run.fill` keeps them and draws the rest, with every prior kind; a raster prior sees only the
kept codes before each drawn one in raster order (`blind_kept` counts those it cannot see).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from einops import reduce
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from stage2_prior.config import SamplingConfig
from vqgen.core.runtime.errors import VQGenError
from vqgen.draws import SEED_STRIDE, sample_seeds
from vqgen.run import Run

MAX_CANVAS_SIDE = 8  # a canvas is at most this many times the trained grid on each side (memory stays bounded)


def parse_box(text: str) -> tuple[int, int, int, int]:
    """"x0,y0,x1,y1" in pixels (x1, y1 exclusive) -> the four integers."""
    try:
        box = tuple(int(part) for part in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise VQGenError(f"--box must be x0,y0,x1,y1 in pixels, got {text!r}")
    return box  # type: ignore[return-value]


def box_mask(box: tuple[int, int, int, int], height: int, width: int) -> Tensor:
    """A box inside an image of `height` x `width` -> (H, W) bool mask, True inside it."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise VQGenError(f"--box {x0},{y0},{x1},{y1} must lie inside the {width}x{height} image with x0 < x1 and "
                         "y0 < y1 (x1 and y1 exclusive)")
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def load_mask(path: str | Path, height: int, width: int) -> Tensor:
    """A mask image (any mode; non-zero pixels are masked) -> (H, W) bool; it must have the images' size."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("L"))
    except (OSError, UnidentifiedImageError) as err:
        raise VQGenError(f"cannot read the mask {path}: {err}") from None
    if array.shape != (height, width):
        raise VQGenError(f"the mask {path} is {array.shape[1]}x{array.shape[0]} but the images are {width}x{height}")
    return torch.from_numpy(array > 0)


def load_images(paths: list[str], channels: int, height: int, width: int) -> Tensor:
    """Image files -> (n, c, H, W) uint8 in the run's mode (grey or colour); each must have the run's size."""
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
        except (OSError, UnidentifiedImageError) as err:
            raise VQGenError(f"cannot read the image {path}: {err}") from None
        if array.shape[:2] != (height, width):
            raise VQGenError(f"{path} is {array.shape[1]}x{array.shape[0]} but the run's images are {width}x{height} "
                             "(resize it first)")
        images.append(torch.from_numpy(array.copy()).reshape(height, width, channels).permute(2, 0, 1))
    return torch.stack(images)


def code_mask(pixels: Tensor, factor: int) -> Tensor:
    """(H, W) bool pixel mask -> (H/f, W/f) bool: a code is masked when any pixel of its f x f cell is."""
    return reduce(pixels, "(h fh) (w fw) -> h w", "max", fh=factor, fw=factor)


def check_hole(drawn: Tensor) -> None:
    """A hole of an inpainting must hide some codes and keep some: all or nothing is not an edit."""
    if not drawn.any():
        raise VQGenError("the mask covers no code: nothing to inpaint")
    if drawn.all():
        raise VQGenError("the mask covers every code: that is sampling, not inpainting (use vqgen sample)")


def blind_kept(keep: Tensor) -> int:
    """(h, w) bool kept codes -> how many come after the first drawn code in raster order: a raster prior
    keeps them but cannot condition on them."""
    flat = keep.flatten()
    holes = (~flat).nonzero()
    return 0 if not len(holes) else int(flat[int(holes[0]):].sum())


def extend(codes: Tensor, top: int, bottom: int, left: int, right: int) -> tuple[Tensor, Tensor]:
    """(n, h, w) codes -> a canvas (n, h+top+bottom, w+left+right) holding them at (top, left), and its (H, W)
    bool mask of kept codes."""
    n, h, w = codes.shape
    canvas = torch.zeros(n, h + top + bottom, w + left + right, dtype=torch.long)
    keep = torch.zeros(canvas.shape[1:], dtype=torch.bool)
    canvas[:, top:top + h, left:left + w] = codes
    keep[top:top + h, left:left + w] = True
    return canvas, keep


def check_canvas(height: int, width: int, grid: tuple[int, int]) -> None:
    """A canvas at least the trained grid's size and at most MAX_CANVAS_SIDE times it on each side."""
    h, w = grid
    if height < h or width < w:
        raise VQGenError(f"a canvas of {width}x{height} codes is smaller than the trained grid of {w}x{h}")
    if height > MAX_CANVAS_SIDE * h or width > MAX_CANVAS_SIDE * w:
        raise VQGenError(f"a canvas of {width}x{height} codes is more than {MAX_CANVAS_SIDE} times the trained grid "
                         f"of {w}x{h} on a side ({MAX_CANVAS_SIDE * w}x{MAX_CANVAS_SIDE * h} at most)")


def window_plan(keep: Tensor, window: tuple[int, int]) -> list[tuple[int, int]]:
    """The windows (top, left) of size `window` that fill every unkept code of a (H, W) canvas, in order: each
    next window is the one whose codes are the most already known (kept or filled) among those that still
    hold an unknown code, ties in raster order. Windows start every quarter window and at the far edges."""
    height, width = keep.shape
    h, w = window

    def starts(side: int, size: int) -> list[int]:
        return sorted({*range(0, side - size + 1, max(1, size // 4)), side - size})

    candidates = [(top, left) for top in starts(height, h) for left in starts(width, w)]
    known = keep.clone()
    plan = []
    while not known.all():
        scores = [(int(known[top:top + h, left:left + w].sum()), -i) for i, (top, left) in enumerate(candidates)
                  if not known[top:top + h, left:left + w].all()]
        best = candidates[-max(scores)[1]]
        plan.append(best)
        known[best[0]:best[0] + h, best[1]:best[1] + w] = True
    return plan


def fill_canvas(run: Run, canvas: Tensor, keep: Tensor, labels: Tensor | None, seed: int,
                sampling: SamplingConfig = SamplingConfig(), first: int = 0) -> Tensor:
    """Fill the unkept codes of (n, H, W) canvases (kept where the (H, W) `keep` is True) by sliding a window of
    the trained grid's size over them (`window_plan`): each window draws its unknown codes given every code
    known in it. Sample i (of index first + i) depends on (seed, first + i) alone."""
    grid = run.vqvae.config.grid_shape
    check_canvas(*canvas.shape[1:], grid)
    n, (h, w) = len(canvas), grid
    canvas, known = canvas.clone(), keep.clone()
    base = sample_seeds(seed, torch.arange(first, first + n))
    for j, (top, left) in enumerate(window_plan(keep, grid)):
        window = canvas[:, top:top + h, left:left + w]
        kept = known[top:top + h, left:left + w]
        unknown = int((~kept).sum())
        steps = (sampling if sampling.steps is None
                 else dataclasses.replace(sampling, steps=min(sampling.steps, unknown)))
        canvas[:, top:top + h, left:left + w] = run.fill(n, labels, base * SEED_STRIDE + j, steps, window,
                                                         kept.expand(n, h, w).clone())
        known[top:top + h, left:left + w] = True
    return canvas
