"""Differentiable augmentation of the discriminator's inputs (DiffAugment, Zhao et al. 2020).

On a small dataset the discriminator soon memorises the real images and its gradients stop teaching the
decoder anything. Augmenting what it sees, the real images and the reconstructions alike, keeps it from
memorising; since the augmentation is differentiable, the generator's adversarial gradient flows back
through it to the reconstruction. Unlike `vqgen.core.data.augment` (which changes the training images
the autoencoder learns from), these transforms are seen by the discriminator only and never leak into the
reconstructions: the decoder is not asked to produce shifted or recoloured images.

The random parameters are drawn once (`draw_augment`) and applied by a pure function (`apply_augment`),
so a real batch and its reconstructions can get the very same transforms (`augment_pair(shared=True)`):
in stage 1 each fake is the reconstruction of a real image of the same batch, and the same transform per
pair leaves the discriminator nothing to tell them apart by but the reconstruction itself. Images in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from vqgen.core.runtime.errors import VQGenError

TRANSLATION = 1 / 8  # largest shift, as a share of each side
CUTOUT = 1 / 2       # side of the cut-out square, as a share of each side




@dataclass
class AugmentDraw:
    """The random parameters of one batch's augmentation; None where that augmentation is off."""

    brightness: Tensor | None = None   # (b, 1, 1, 1), added, in [-0.5, 0.5)
    saturation: Tensor | None = None   # (b, 1, 1, 1), factor on the distance to the grey value, in [0, 2)
    contrast: Tensor | None = None     # (b, 1, 1, 1), factor on the distance to the image mean, in [0.5, 1.5)
    shift: Tensor | None = None        # (b, 2) int64, pixels down and right, within 1/8 of each side
    cutout: Tensor | None = None       # (b, 2) int64, top-left row and column of the square (may lie outside)


def _uniform(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> Tensor:
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _integers(low: int, high: int, shape: tuple[int, ...], device: torch.device,
              generator: torch.Generator | None) -> Tensor:
    """Uniform integers in [low, high]."""
    if generator is None:
        return torch.randint(low, high + 1, shape, device=device)
    return torch.randint(low, high + 1, shape, generator=generator, device=generator.device).to(device)


def draw_augment(names: tuple[str, ...], batch: int, height: int, width: int, device: torch.device,
                 generator: torch.Generator | None = None) -> AugmentDraw:
    """Random parameters for `batch` images of `height` x `width`, from `generator` or the global RNG of
    `device` (which the training state saves, so a resumed run draws the same)."""
    draw = AugmentDraw()
    if "color" in names:
        draw.brightness = _uniform((batch, 1, 1, 1), device, generator) - 0.5
        draw.saturation = _uniform((batch, 1, 1, 1), device, generator) * 2
        draw.contrast = _uniform((batch, 1, 1, 1), device, generator) + 0.5
    if "translation" in names:
        mh, mw = int(height * TRANSLATION + 0.5), int(width * TRANSLATION + 0.5)
        draw.shift = torch.stack([_integers(-mh, mh, (batch,), device, generator),
                                  _integers(-mw, mw, (batch,), device, generator)], dim=1)
    if "cutout" in names:
        sh, sw = int(height * CUTOUT + 0.5), int(width * CUTOUT + 0.5)
        # the square's centre anywhere in the image: near a border part of it falls outside
        draw.cutout = torch.stack([_integers(0, height - 1, (batch,), device, generator) - sh // 2,
                                   _integers(0, width - 1, (batch,), device, generator) - sw // 2], dim=1)
    return draw


def apply_augment(x: Tensor, draw: AugmentDraw) -> Tensor:
    """(b, c, h, w) -> (b, c, h, w): colour, then translation (zeros shift in), then cutout (a square of
    zeros). Every step is linear in `x` for fixed parameters, so gradients flow back to `x`."""
    b, _, h, w = x.shape
    if draw.brightness is not None:
        x = x + draw.brightness.to(x.dtype)
    if draw.saturation is not None:
        grey = x.mean(dim=1, keepdim=True)  # (b, 1, h, w)
        x = (x - grey) * draw.saturation.to(x.dtype) + grey
    if draw.contrast is not None:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (b, 1, 1, 1)
        x = (x - mean) * draw.contrast.to(x.dtype) + mean
    if draw.shift is not None:
        mh, mw = int(h * TRANSLATION + 0.5), int(w * TRANSLATION + 0.5)
        padded = F.pad(x, (mw, mw, mh, mh))  # (b, c, h + 2mh, w + 2mw), zeros around
        rows = torch.arange(h, device=x.device) + mh - draw.shift[:, :1]  # (b, h)
        cols = torch.arange(w, device=x.device) + mw - draw.shift[:, 1:]  # (b, w)
        picked = padded[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        x = rearrange(picked, "b h w c -> b c h w")  # advanced indexing put the channels last
    if draw.cutout is not None:
        sh, sw = int(h * CUTOUT + 0.5), int(w * CUTOUT + 0.5)
        rows = torch.arange(h, device=x.device) - draw.cutout[:, :1]  # (b, h), 0 at the square's top
        cols = torch.arange(w, device=x.device) - draw.cutout[:, 1:]  # (b, w)
        inside = ((rows >= 0) & (rows < sh))[:, :, None] & ((cols >= 0) & (cols < sw))[:, None, :]  # (b, h, w)
        x = x * (~inside)[:, None].to(x.dtype)
    return x


def augment_pair(real: Tensor, fake: Tensor, names: tuple[str, ...], shared: bool = True,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Augment a real batch and a fake one for the discriminator: with the same parameters per image pair
    when `shared` (the batches must then have one shape), else with independent draws (DiffAugment's way)."""
    if not names:
        return real, fake
    if shared and real.shape != fake.shape:
        raise VQGenError(f"shared augmentation needs real and fake batches of one shape, got {tuple(real.shape)} "
                         f"and {tuple(fake.shape)}")
    b, _, h, w = real.shape
    draw = draw_augment(names, b, h, w, real.device, generator)
    other = draw if shared else draw_augment(names, fake.shape[0], *fake.shape[2:], fake.device, generator)
    return apply_augment(real, draw), apply_augment(fake, other)
