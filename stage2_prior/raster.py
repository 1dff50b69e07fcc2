"""The raster (autoregressive) priors' objective: teacher-forced cross-entropy, and held-out bits per code.

`stage2_prior.registry.PriorKind` names each kind's loss and held-out functions; these are the
Transformer's and the PixelCNN's (the masked prior's are in `stage2_prior.masked`).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from stage2_prior.config import PriorConfig
from stage2_prior.contract import grid_nll
from vqgen.core.evaluate.measures import bits


def raster_loss(model: nn.Module, codes: Tensor, labels: Tensor | None,
                smoothing: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """(b, h, w) codes -> mean nats per code of the teacher-forced logits (`smoothing`: with label smoothing),
    and the scalars to log: the loss, and the true bits per code, which smoothing leaves out."""
    logits = rearrange(model(codes, labels).float(), "b h w k -> (b h w) k")
    targets = codes.flatten().long()
    loss = F.cross_entropy(logits, targets, label_smoothing=smoothing)
    nll = F.cross_entropy(logits, targets).detach() if smoothing else loss.detach()
    return loss, {"loss": loss.detach(), "bits_per_code": nll / math.log(2)}


def raster_held_out(model: nn.Module, config: PriorConfig, batches: Iterable[tuple[Tensor, Tensor | None, Tensor]],
                    gather: Callable[[Tensor], Tensor]) -> dict[str, float]:
    """Test batches (codes, labels or None, index) -> bits per code and per image of the joint p(grid | class)."""
    total = []
    for codes, labels, _ in batches:
        nll = grid_nll(model, codes, labels)
        total.append(gather(nll).cpu())
    per_grid = bits(torch.cat(total).mean().item())
    t = config.grid_height * config.grid_width
    return {"bits_per_code": per_grid / t, "bits_per_image": per_grid}
