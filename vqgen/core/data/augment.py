"""Augmentation of image batches: horizontal flips and small translations, on whatever device they are.

Stage 1 augments each training batch (global RNG: saved with the training state, so resume stays
exact); the code dump encodes augmented copies of the training images (a seeded generator: the
same copies every time) so that a small dataset gives the prior more grids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from vqgen.core.data.images import ImageSplit, to_model_range, to_uint8


def _draw(fn, *args, generator: torch.Generator | None, device: torch.device, **kwargs) -> Tensor:
    """Random numbers from `generator` (on its device) or the global RNG of `device`, moved to `device`."""
    if generator is None:
        return fn(*args, device=device, **kwargs)
    return fn(*args, generator=generator, device=generator.device, **kwargs).to(device)


def augment(x: Tensor, names: tuple[str, ...], generator: torch.Generator | None = None) -> Tensor:
    """(b, c, h, w) -> (b, c, h, w): each image mirrored with probability 1/2 ("flip") and shifted by up
    to 1/8 of each side ("translate", edge pixels repeated into the gap). Pixel values are moved, never mixed."""
    b, _, h, w = x.shape
    if "flip" in names:
        flip = _draw(torch.rand, b, generator=generator, device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if "translate" in names:
        mh, mw = max(1, h // 8), max(1, w // 8)
        dy = _draw(torch.randint, -mh, mh + 1, (b,), generator=generator, device=x.device)
        dx = _draw(torch.randint, -mw, mw + 1, (b,), generator=generator, device=x.device)
        padded = F.pad(x, (mw, mw, mh, mh), mode="replicate")  # (b, c, h + 2mh, w + 2mw)
        rows = torch.arange(h, device=x.device) + mh - dy[:, None]  # (b, h)
        cols = torch.arange(w, device=x.device) + mw - dx[:, None]  # (b, w)
        picked = padded[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        x = rearrange(picked, "b h w c -> b c h w")  # advanced indexing put the channels last
    return x


def with_augmented_copies(split: ImageSplit, names: tuple[str, ...], copies: int, seed: int,
                          chunk: int = 4096) -> ImageSplit:
    """The split followed by `copies` augmented versions of every image (labels repeated): n*(1+copies) images."""
    if copies == 0:
        return split
    generator = torch.Generator().manual_seed(seed)
    parts = [split.images]
    for _ in range(copies):
        parts += [to_uint8(augment(to_model_range(c), names, generator)) for c in split.images.split(chunk)]
    labels = None if split.labels is None else split.labels.repeat(1 + copies)
    return ImageSplit(torch.cat(parts), labels)
