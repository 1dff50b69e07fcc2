"""The contract every prior keeps (the raster ones' decoding protocol below too): their shared config fields,
input checks, labels and the NLL.

A prior maps `(b, h, w)` codes and `(b,)` labels to `(b, h, w, k)` logits (teacher-forced, code
i seeing only codes < i), and is sampled through `state = prior.start(labels, b)` then, for every
raster position, `logits, state = prior.step(state, codes, pos)`; see `ARPrior`.

Checks that read tensor values (code and label ranges) wait for the device, so they run where
data enters (loading codes, sampling), not in `forward`.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from stage2_prior.config import PriorConfig
from vqgen.core.runtime.errors import VQGenError


class ARPrior(Protocol):
    """What `sample_codes` needs from a prior (both `TransformerPrior` and `PixelCNNPrior`)."""

    config: PriorConfig
    training: bool

    def start(self, labels: Tensor | None, batch_size: int) -> Any: ...

    def step(self, state: Any, codes: Tensor, pos: int) -> tuple[Tensor, Any]: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...


def check_code_shape(codes: Tensor, config: PriorConfig) -> None:
    """Refuse a code grid that is not (b, h, w) integers; reads no values (no device sync)."""
    h, w = config.grid_height, config.grid_width
    if codes.ndim != 3 or tuple(codes.shape[1:]) != (h, w):
        raise VQGenError(f"codes must have shape (b, {h}, {w}), got {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise VQGenError(f"codes must be an integer tensor, got {codes.dtype}")


def check_codes(codes: Tensor, config: PriorConfig) -> None:
    """Refuse a code grid (b, h, w) of the wrong shape, dtype or range (at the boundary: one sync)."""
    check_code_shape(codes, config)
    k = config.codebook_size
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= k:
            raise VQGenError(f"codes must be in [0, {k}), got {lo if lo < 0 else hi}")


def resolve_labels(labels: Tensor | None, batch_size: int, config: PriorConfig, device: torch.device) -> Tensor:
    """(b,) class indices, the null class `num_classes` standing in for `None`; reads no values."""
    null = config.num_classes
    if labels is None:
        return torch.full((batch_size,), null, dtype=torch.long, device=device)
    if null == 0:
        raise VQGenError("this prior is unconditional (num_classes=0) but labels were given")
    if labels.shape != (batch_size,) or labels.dtype.is_floating_point:
        got = f"{labels.dtype} {tuple(labels.shape)}"
        raise VQGenError(f"labels must be an integer tensor of shape ({batch_size},), got {got}")
    return labels.to(device=device, dtype=torch.long)


def check_labels(labels: Tensor, batch_size: int, config: PriorConfig) -> None:
    """`resolve_labels`' checks plus the range [0, num_classes] (at the boundary: one sync)."""
    resolve_labels(labels, batch_size, config, labels.device)
    null = config.num_classes
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi > null:
            raise VQGenError(f"labels must be in [0, {null}] ({null} = null class), got {lo if lo < 0 else hi}")


def drop_labels(labels: Tensor, config: PriorConfig) -> Tensor:
    """Replace each label by the null class with probability `label_dropout` (global RNG)."""
    if config.num_classes == 0 or config.label_dropout == 0.0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device) < config.label_dropout
    return labels.masked_fill(drop, config.num_classes)


def drop_codes(codes: Tensor, config: PriorConfig) -> Tensor:
    """Replace each input code by a code drawn uniformly from the K with probability `code_dropout` (global RNG,
    as dropout), so the prior learns to predict through the slips its own samples make; the targets of the
    loss stay the true codes."""
    if config.code_dropout == 0.0:
        return codes
    drop = torch.rand(codes.shape, device=codes.device) < config.code_dropout
    noise = torch.randint(0, config.codebook_size, codes.shape, device=codes.device, dtype=codes.dtype)
    return torch.where(drop, noise, codes)


def grid_nll(prior: nn.Module, codes: Tensor, labels: Tensor | None) -> Tensor:
    """(b, h, w) integer codes (int16 as stored, or int64) -> (b,) negative log-likelihood of each grid in nats."""
    codes = codes.long()
    logits = prior(codes, labels)  # (b, h, w, k)
    nll = F.cross_entropy(rearrange(logits.float(), "b h w k -> b k h w"), codes, reduction="none")
    return nll.flatten(1).sum(1)
