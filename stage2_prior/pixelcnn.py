"""Gated PixelCNN prior (van den Oord et al. 2016) over a grid of VQ codes, without a blind spot.

A vertical stack sees the rows above and the current row; shifted down one row it feeds a
horizontal stack that sees the codes to the left. Causality comes from mask buffers
multiplied into the kernels at every call, never from editing the weights. Decoding keeps
both stacks' inputs in a `PixelCNNState`, so each step computes one position per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from stage2_prior.config import PixelCNNConfig
from stage2_prior.contract import check_code_shape, drop_codes, drop_labels, resolve_labels
from vqgen.core.runtime.errors import VQGenError


@dataclass
class PixelCNNState:
    """What decoding has computed before position `pos`, one tensor per layer; `step` updates it in place.

    p = kernel_size // 2. The current row is the row of `pos`; zero padding stands in for the grid's outside.
    """

    labels: Tensor  # (b,) class indices, the null class included
    pos: int  # the position the next `step` decodes
    v_above: list[Tensor]  # (b, c, p, w) the layer's vertical input on the p rows above the current row
    from_above: list[Tensor]  # (b, 2c, 1, w) what the layer's horizontal stack adds on the current row
    h_row: list[Tensor]  # (b, c, 1, p + w) the layer's horizontal input on the current row, left of `pos`


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
        self.kept = (int(mask.any(1).sum()), int(mask.any(0).sum()))  # the kept taps: a top-left block
        assert mask.sum() == self.kept[0] * self.kept[1] and mask[: self.kept[0], : self.kept[1]].all()

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)

    def window(self, x: Tensor, pad_w: int = 0) -> Tensor:
        """`forward` at the output row kh//2 below x's top, x holding only the rows the kept taps read:
        a whole row with pad_w = kw//2, or one position with pad_w = 0 and x just the kept columns."""
        kh, kw = self.kept
        return F.conv2d(x, (self.weight * self.mask)[:, :, :kh, :kw], self.bias, padding=(0, pad_w))


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
        v_pre = self.vertical(self.v_conv(v), labels)  # (b, 2c, h, w)
        above = self.from_above(shift_down(v_pre), labels)  # rows strictly above: no blind spot, no leak
        return gate(v_pre), self.horizontal(self.h_conv(h) + above, h)

    def vertical(self, v_conv: Tensor, labels: Tensor) -> Tensor:
        """(b, 2c, h, w) vertical convolution -> pre-gate vertical features, label term added."""
        return v_conv + rearrange(self.cond_v(labels), "b c -> b c 1 1")

    def from_above(self, v_pre: Tensor, labels: Tensor) -> Tensor:
        """(b, 2c, h, w) pre-gate vertical features, shifted down -> what the horizontal stack adds there."""
        return self.v_to_h(v_pre) + rearrange(self.cond_h(labels), "b c -> b c 1 1")

    def horizontal(self, h_pre: Tensor, h: Tensor) -> Tensor:
        """(b, 2c, h, w) pre-gate horizontal features, (b, c, h, w) layer input -> horizontal output."""
        h_new = self.h_out(self.drop(gate(h_pre)))  # (b, c, h, w)
        # The first layer's input still holds the current code, so it gets no residual.
        return h_new if self.first else h + h_new


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
        check_code_shape(codes, self.config)
        labels = resolve_labels(labels, codes.shape[0], self.config, codes.device)
        codes = codes.long()
        if self.training:
            labels, codes = drop_labels(labels, self.config), drop_codes(codes, self.config)
        logits = self.head(self._features(codes, labels))  # (b, k, h, w)
        return rearrange(logits, "b k h w -> b h w k")

    def start(self, labels: Tensor | None, batch_size: int) -> PixelCNNState:
        """Decoding state for b rows, at position 0; labels may include the null class."""
        weight = self.code_emb.weight
        labels = resolve_labels(labels, batch_size, self.config, weight.device)
        b, c, p, w = batch_size, self.config.channels, self.config.kernel_size // 2, self.config.grid_width
        nothing_above = weight.new_zeros(b, 2 * c, 1, w)  # row 0 sees only zero padding above
        return PixelCNNState(
            labels=labels,
            pos=0,
            v_above=[weight.new_zeros(b, c, p, w) for _ in self.layers],
            from_above=[layer.from_above(nothing_above, labels) for layer in self.layers],
            h_row=[weight.new_zeros(b, c, 1, p + w) for _ in self.layers],
        )

    def step(self, state: PixelCNNState, codes: Tensor, pos: int) -> tuple[Tensor, PixelCNNState]:
        """(b, t) codes filled before `pos` -> (b, k) logits of code `pos`; one step per position, in raster order.

        Reads only the codes new since the last step: pos-1, or the whole row above when `pos` starts a row.
        Then, if `pos` starts a row, runs each layer's vertical stack on the row above (from a (p+1)-row window);
        runs each layer's horizontal stack at `pos` alone (from a 1 x (p or p+1) window), and the head at `pos`.
        """
        cfg, s = self.config, state
        p, w = cfg.kernel_size // 2, cfg.grid_width
        if not 0 <= pos < cfg.seq_len:
            raise VQGenError(f"pos must be in [0, {cfg.seq_len}), got {pos}")
        if pos != s.pos:
            raise VQGenError(f"step expects pos {s.pos} (one step per position, in raster order), got {pos}")
        row, col = divmod(pos, w)
        if col == 0 and row > 0:
            self._finish_row(s, rearrange(self.code_emb(codes[:, pos - w : pos]), "b w c -> b c 1 w"))
        if col > 0:
            s.h_row[0][:, :, 0, p + col - 1] = self.code_emb(codes[:, pos - 1])
        for i, layer in enumerate(self.layers):
            window = s.h_row[i][..., col : col + layer.h_conv.kept[1]]  # (b, c, 1, p or p+1) columns col-p..
            h_pre = layer.h_conv.window(window) + s.from_above[i][..., col : col + 1]  # (b, 2c, 1, 1)
            h = layer.horizontal(h_pre, s.h_row[i][..., p + col : p + col + 1])  # (b, c, 1, 1)
            if i + 1 < len(self.layers):
                s.h_row[i + 1][..., p + col : p + col + 1] = h
        s.pos = pos + 1
        return rearrange(self.head(h), "b k 1 1 -> b k"), s

    def _finish_row(self, s: PixelCNNState, x: Tensor) -> None:
        """(b, c, 1, w) embeddings of the row just decoded -> the vertical stack on it; start the next row."""
        p = self.config.kernel_size // 2
        for i, layer in enumerate(self.layers):
            window = torch.cat([s.v_above[i], x], dim=2)  # (b, c, p+1, w): the rows v_conv sees
            v_pre = layer.vertical(layer.v_conv.window(window, pad_w=p), s.labels)  # (b, 2c, 1, w)
            s.from_above[i] = layer.from_above(v_pre, s.labels)
            s.v_above[i] = window[:, :, 1:]
            s.h_row[i] = torch.zeros_like(s.h_row[i])
            x = gate(v_pre)
