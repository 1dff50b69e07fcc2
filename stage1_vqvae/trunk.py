"""The scalable encoder/decoder trunk (architecture "resnet"): levels of GroupNorm + SiLU residual blocks.

Level i works at 1/2^i of the image side with `width * mults[i]` channels; between levels a stride-2
conv halves the side (encoder) or nearest-neighbour upsampling and a conv doubles it (decoder). At the
lowest resolution a middle block (residual, optional self-attention, residual) mixes the whole grid.

With a patch fold p > 1 the encoder first moves each p x p pixel patch into channels (pixel unshuffle:
(b, c, H, W) -> (b, c*p*p, H/p, W/p)) and the decoder's last conv predicts the c*p*p values that pixel
shuffle puts back: the trunk's levels start at 1/p of the side, where convs are wider and cheaper than
thin ones over every pixel, and the fold takes log2(p) of the halvings of f.

Beside the trunk, an optional linear path carries each code's average colour: the encoder adds a 1x1
projection of the image averaged over the code's f x f pixels to z_e, the decoder adds a 1x1 projection of
z_q, upsampled bilinearly, to its output. The trunk then models the detail on top of a base that is linear
in the pixels, so brightness and colours that the training images never showed still come back: without it,
the normalised trunk trained on seven reddish photos turned a blue sky grey (README, "Real photos").
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm of at most 32 groups of at least 8 channels (fewer only below 8 channels).

    One channel per group would be instance normalisation: every block would erase each channel's mean
    and contrast over the image, the very colour and brightness a decoder must reproduce. Measured on
    64-px photo crops after 60 equal steps: 1 channel per group 14.95 dB, 8 per group 17.71 dB."""
    return nn.GroupNorm(math.gcd(32, max(1, channels // 8)), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """x -> skip(x) + conv3x3(silu(norm(conv3x3(silu(norm(x)))))); a 1x1 skip when the width changes."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """x + single-head self-attention over the h*w positions of the grid."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three c) h w -> three b 1 (h w) c", three=3)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, 1, t, c)
        return x + self.proj(rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w))


class Downsample(nn.Module):
    """(b, c, h, w) -> (b, c, h/2, w/2): a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """(b, c, h, w) -> (b, c, 2h, 2w): nearest-neighbour, then a 3x3 conv (no checkerboard)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def middle(channels: int, attention: bool) -> nn.Sequential:
    """The lowest-resolution block: residual, optional self-attention, residual."""
    return nn.Sequential(ResnetBlock(channels, channels), AttnBlock(channels) if attention else nn.Identity(),
                         ResnetBlock(channels, channels))


class ResnetEncoder(nn.Module):
    """(b, c, H, W) -> (b, d, H/f, W/f) with f = patch * 2^(len(mults) - 1).

    levels[i] maps to (b, width * mults[i], H/(patch*2^i), W/(patch*2^i)); levels but the last end in a
    Downsample.
    """

    def __init__(self, in_channels: int, width: int, mults: tuple[int, ...], num_res_blocks: int,
                 attention: bool, code_dim: int, linear_path: bool = False, patch: int = 1):
        super().__init__()
        self.patch = patch
        self.factor = patch * 2 ** (len(mults) - 1)
        self.linear_path = nn.Conv2d(in_channels, code_dim, 1) if linear_path else None
        self.conv_in = nn.Conv2d(in_channels * patch * patch, width * mults[0], 3, padding=1)
        self.levels = nn.ModuleList()
        ch = width * mults[0]
        for i, mult in enumerate(mults):
            blocks: list[nn.Module] = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(ch, width * mult))
                ch = width * mult
            if ch != width * mult:  # num_res_blocks == 0: still reach this level's width
                blocks.append(nn.Conv2d(ch, width * mult, 1))
                ch = width * mult
            if i < len(mults) - 1:
                blocks.append(Downsample(ch))
            self.levels.append(nn.Sequential(*blocks))
        self.middle = middle(ch, attention)
        self.conv_out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, code_dim, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(F.pixel_unshuffle(x, self.patch) if self.patch > 1 else x)
        for level in self.levels:
            h = level(h)
        z = self.conv_out(self.middle(h))  # (b, d, H/f, W/f)
        if self.linear_path is not None:
            z = z + self.linear_path(F.avg_pool2d(x, self.factor))
        return z


class ResnetDecoder(nn.Module):
    """(b, d, h, w) -> (b, c, h*f, w*f), the encoder's mirror.

    levels[j] works on level i = len(mults) - 1 - j: residual blocks to (b, width * mults[i], H/(patch*2^i),
    W/(patch*2^i)), then, unless i = 0, an Upsample to twice that side.
    """

    def __init__(self, in_channels: int, width: int, mults: tuple[int, ...], num_res_blocks: int,
                 attention: bool, code_dim: int, linear_path: bool = False, patch: int = 1):
        super().__init__()
        self.patch = patch
        self.factor = patch * 2 ** (len(mults) - 1)
        self.linear_path = nn.Conv2d(code_dim, in_channels, 1) if linear_path else None
        ch = width * mults[-1]
        self.conv_in = nn.Conv2d(code_dim, ch, 3, padding=1)
        self.middle = middle(ch, attention)
        self.levels = nn.ModuleList()
        for i in reversed(range(len(mults))):
            blocks: list[nn.Module] = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(ch, width * mults[i]))
                ch = width * mults[i]
            if ch != width * mults[i]:
                blocks.append(nn.Conv2d(ch, width * mults[i], 1))
                ch = width * mults[i]
            if i > 0:
                blocks.append(Upsample(ch))
            self.levels.append(nn.Sequential(*blocks))
        self.conv_out = nn.Sequential(group_norm(ch), nn.SiLU(),
                                      nn.Conv2d(ch, in_channels * patch * patch, 3, padding=1))

    def forward(self, z: Tensor) -> Tensor:
        h = self.middle(self.conv_in(z))
        for level in self.levels:
            h = level(h)
        out = self.conv_out(h)  # (b, c*p*p, H/p, W/p)
        if self.patch > 1:
            out = F.pixel_shuffle(out, self.patch)  # (b, c, H, W)
        if self.linear_path is not None:
            out = out + F.interpolate(self.linear_path(z), scale_factor=self.factor, mode="bilinear")
        return out
