"""Gated PixelCNN prior (van den Oord et al. 2016) over a grid of VQ codes, without a blind spot.

A vertical stack sees the rows above and the current row; shifted down one row it feeds a
horizontal stack that sees the codes to the left. Causality comes from mask buffers
multiplied into the kernels at every call, never from editing the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from stage2_prior.sampling import PriorConfig, check_codes, drop_labels, resolve_labels
from vqgen.errors import VQGenError


@dataclass(frozen=True)
class PixelCNNConfig(PriorConfig):
    """Architecture of `PixelCNNPrior`; the shared prior fields come from `PriorConfig`."""

    channels: int = 128  # c
    n_layers: int = 8
    kernel_size: int = 3  # odd; each layer widens the receptive field by kernel_size // 2

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("channels", "n_layers"):
            if getattr(self, name) < 1:
                raise VQGenError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kernel_size < 3 or self.kernel_size % 2 == 0:
            raise VQGenError(f"kernel_size must be odd and >= 3, got {self.kernel_size}")


@dataclass
class PixelCNNState:
    """Decoding state: only the labels, since `step` recomputes the rows it needs."""

    labels: Tensor  # (b,) class indices, the null class included


def vertical_mask(k: int) -> Tensor:
    """(k, k) mask keeping the kernel rows above and at the centre."""
    mask = torch.zeros(k, k)
    mask[: k // 2 + 1] = 1.0
    return mask


def horizontal_mask(k: int, include_centre: bool) -> Tensor:
    """(1, k) mask keeping the columns left of the centre, and the centre itself for type B."""
    mask = torch.zeros(1, k)
    mask[:, : k // 2 + int(include_centre)] = 1.0
    return mask


def gate(x: Tensor) -> Tensor:
    """(b, 2c, h, w) -> (b, c, h, w): tanh(a) * sigmoid(b)."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def shift_down(x: Tensor) -> Tensor:
    """(b, c, h, w) -> (b, c, h, w) with row r holding row r-1 and zeros on top."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


class MaskedConv2d(nn.Conv2d):
    """A same-size convolution whose kernel is multiplied by a fixed 0/1 mask buffer."""

    def __init__(self, in_channels: int, out_channels: int, mask: Tensor):
        kh, kw = mask.shape
        super().__init__(in_channels, out_channels, (kh, kw), padding=(kh // 2, kw // 2))
        self.register_buffer("mask", mask[None, None], persistent=False)  # (1, 1, kh, kw), rebuilt from config

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class GatedLayer(nn.Module):
    """One gated layer of both stacks; the first one (type A) hides the current code from the horizontal stack."""

    def __init__(self, cfg: PixelCNNConfig, first: bool):
        super().__init__()
        c, k = cfg.channels, cfg.kernel_size
        self.first = first
        self.v_conv = MaskedConv2d(c, 2 * c, vertical_mask(k))
        self.h_conv = MaskedConv2d(c, 2 * c, horizontal_mask(k, include_centre=not first))
        self.v_to_h = nn.Conv2d(2 * c, 2 * c, 1)
        self.h_out = nn.Conv2d(c, c, 1)
        self.cond_v = nn.Embedding(cfg.num_classes + 1, 2 * c)
        self.cond_h = nn.Embedding(cfg.num_classes + 1, 2 * c)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, v: Tensor, h: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(b, c, h, w) vertical and horizontal features, (b,) labels -> both stacks after this layer."""
        v_pre = self.v_conv(v) + rearrange(self.cond_v(labels), "b c -> b c 1 1")  # (b, 2c, h, w)
        h_pre = (
            self.h_conv(h)
            + self.v_to_h(shift_down(v_pre))  # rows strictly above: no blind spot, no leak
            + rearrange(self.cond_h(labels), "b c -> b c 1 1")
        )
        h_new = self.h_out(self.drop(gate(h_pre)))  # (b, c, h, w)
        # The first layer's input still holds the current code, so it gets no residual.
        return gate(v_pre), h_new if self.first else h + h_new


class PixelCNNPrior(nn.Module):
    """p(codes | class) as a gated PixelCNN; `forward` scores a whole grid, `start`/`step` decode."""

    def __init__(self, config: PixelCNNConfig):
        super().__init__()
        self.config = config
        c = config.channels
        self.code_emb = nn.Embedding(config.codebook_size, c)
        self.layers = nn.ModuleList(GatedLayer(config, first=i == 0) for i in range(config.n_layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 1), nn.ReLU(), nn.Conv2d(c, config.codebook_size, 1))

    def _features(self, codes: Tensor, labels: Tensor) -> Tensor:
        """(b, r, w) codes of the top r rows -> (b, c, r, w) horizontal-stack features."""
        x = rearrange(self.code_emb(codes), "b h w c -> b c h w")
        v, h = x, x
        for layer in self.layers:
            v, h = layer(v, h, labels)
        return h

    def forward(self, codes: Tensor, labels: Tensor | None = None) -> Tensor:
        """(b, h, w) codes, (b,) labels or None (null class) -> (b, h, w, k) logits, teacher-forced."""
        check_codes(codes, self.config)
        labels = resolve_labels(labels, codes.shape[0], self.config, codes.device)
        if self.training:
            labels = drop_labels(labels, self.config)
        logits = self.head(self._features(codes.long(), labels))  # (b, k, h, w)
        return rearrange(logits, "b k h w -> b h w k")

    def start(self, labels: Tensor | None, batch_size: int) -> PixelCNNState:
        """Decoding state for b rows; labels may include the null class."""
        device = self.code_emb.weight.device
        return PixelCNNState(resolve_labels(labels, batch_size, self.config, device))

    def step(self, state: PixelCNNState, codes: Tensor, pos: int) -> tuple[Tensor, PixelCNNState]:
        """(b, t) codes filled before `pos` -> (b, k) logits of code `pos`.

        Recomputes every layer on rows 0..row(pos) of the grid (rows below cannot reach `pos`,
        codes at or after `pos` are masked out), then the head at `pos` alone.
        """
        w = self.config.grid_width
        if not 0 <= pos < self.config.seq_len:
            raise VQGenError(f"pos must be in [0, {self.config.seq_len}), got {pos}")
        row, col = divmod(pos, w)
        top = rearrange(codes[:, : (row + 1) * w], "b (h w) -> b h w", w=w)  # (b, row+1, w)
        h = self._features(top, state.labels)  # (b, c, row+1, w)
        logits = self.head(h[:, :, row : row + 1, col : col + 1])  # (b, k, 1, 1)
        return rearrange(logits, "b k 1 1 -> b k"), state
