"""Masked prior (MaskGIT, Chang et al. 2022): a bidirectional Transformer that predicts hidden codes.

Input: the class token, then every code of the grid with the hidden ones replaced by the [MASK] token
(id `codebook_size`), plus row and column embeddings; output i is the distribution of code i given the
class and every visible code. Training hides ceil(cos(pi/2 u) * t) random codes of each grid, u ~ U(0, 1),
and scores the hidden ones only (`masked_loss`); `stage2_prior.parallel` decodes a grid in a few steps.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from stage2_prior.config import MaskedConfig, PriorConfig
from stage2_prior.contract import check_code_shape, drop_codes, drop_labels, resolve_labels
from stage2_prior.transformer import Block, _init_weights, block_mods, class_modulation
from vqgen.core.evaluate.measures import bits
from vqgen.core.runtime.errors import VQGenError

# Masks per test grid in the held-out number. One costs what the autoregressive priors' evaluation costs
# (one forward pass per grid); the masks are the same at every evaluation, so two checkpoints are compared
# on the same hidden codes, and a test set of a few dozen grids already spans the schedule (`held_out_masks`).
HELD_OUT_MASKS = 1
_GOLDEN = (math.sqrt(5) - 1) / 2  # the Weyl sequence frac(0.5 + i * _GOLDEN) spreads any run of grids evenly


def check_mask_shape(mask: Tensor, codes: Tensor) -> None:
    """Refuse a mask that is not a bool tensor shaped like the codes; reads no values (no device sync)."""
    if mask.dtype != torch.bool or mask.shape != codes.shape:
        raise VQGenError(f"mask must be a bool tensor of shape {tuple(codes.shape)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")


class MaskedPrior(nn.Module):
    """p(hidden codes | class, visible codes) as a bidirectional pre-LN Transformer."""

    def __init__(self, config: MaskedConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.class_emb = nn.Embedding(config.num_classes + 1, d)  # each class, then null (alone if unconditional)
        self.code_emb = nn.Embedding(config.codebook_size + 1, d)  # each code, then [MASK]
        self.row_emb = nn.Parameter(torch.randn(config.grid_height, d) * 0.02)
        self.col_emb = nn.Parameter(torch.randn(config.grid_width, d) * 0.02)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, causal=False) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.codebook_size, bias=False)  # never predicts [MASK]
        self.class_mod = class_modulation(config)
        self.apply(_init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual branches scaled down with depth
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layers))

    def forward(self, codes: Tensor, labels: Tensor | None, mask: Tensor) -> Tensor:
        """(b, h, w) codes, (b,) labels or None (null class), (b, h, w) bool mask (True: hidden) -> (b, h, w, k)
        logits of every position; a hidden code's value is never read."""
        cfg = self.config
        check_code_shape(codes, cfg)
        check_mask_shape(mask, codes)
        labels = resolve_labels(labels, codes.shape[0], cfg, codes.device)
        codes = codes.long()
        if self.training:
            labels, codes = drop_labels(labels, cfg), drop_codes(codes, cfg)  # hidden codes stay hidden
        tokens = rearrange(codes.masked_fill(mask, cfg.mask_id), "b h w -> b (h w)")
        positions = rearrange(self.row_emb[:, None] + self.col_emb[None], "h w d -> (h w) d")
        class_emb = self.class_emb(labels)  # (b, d)
        x = torch.cat([class_emb[:, None], self.code_emb(tokens) + positions], dim=1)  # (b, 1+t, d)
        x = self.drop(x)
        for block, mod in zip(self.blocks, block_mods(self.class_mod, class_emb, cfg.n_layers)):
            x = block(x, mod)
        logits = self.head(self.ln_f(x[:, 1:]))  # (b, t, k); the class token's output is not a code
        return rearrange(logits, "b (h w) k -> b h w k", h=cfg.grid_height)


# -- masks ---------------------------------------------------------------------------------------------


def mask_counts(u: Tensor, t: int) -> Tensor:
    """(b,) points u in [0, 1) of the schedule -> (b,) codes to hide: ceil(cos(pi/2 u) * t), in [1, t]."""
    return torch.ceil(torch.cos(u * (math.pi / 2)) * t).long().clamp(1, t)


def masks_from(u: Tensor, keys: Tensor) -> Tensor:
    """(b,) schedule points, (b, t) random keys -> (b, t) bool: the `mask_counts(u)` positions of lowest key."""
    ranks = keys.argsort(dim=1).argsort(dim=1)  # (b, t): 0 for the lowest key
    return ranks < mask_counts(u, keys.shape[1])[:, None]


def draw_masks(b: int, t: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Tensor:
    """(b, t) bool training masks, MaskGIT's cosine schedule: u ~ U(0, 1) per grid, then ceil(cos(pi/2 u) t)
    random positions. Without `generator` it draws from the device's global RNG, as dropout does, which the
    trainer seeds and restores on resume."""
    u = torch.rand(b, device=device, generator=generator)
    keys = torch.rand(b, t, device=device, generator=generator)
    return masks_from(u, keys)


def held_out_masks(index: Tensor, t: int, per_grid: int = HELD_OUT_MASKS) -> Tensor:
    """(b,) indices of test grids in their split -> (b, per_grid, t) bool masks, a function of the index alone.

    Mask j of grid i hides `mask_counts(u)` codes with u = (j + frac(0.5 + i * 0.618...)) / per_grid: one
    point in each of `per_grid` equal strata of the schedule, and consecutive grids spread evenly over it;
    which codes is drawn by `torch.Generator().manual_seed(i)`.
    """
    index = index.cpu().long()
    offset = (0.5 + index.double() * _GOLDEN) % 1.0  # (b,)
    u = (torch.arange(per_grid) + offset[:, None]) / per_grid  # (b, m)
    keys = torch.stack([torch.rand(per_grid, t, generator=torch.Generator().manual_seed(i)) for i in index.tolist()])
    masks = masks_from(rearrange(u, "b m -> (b m)"), rearrange(keys, "b m t -> (b m) t"))
    return rearrange(masks, "(b m) t -> b m t", m=per_grid)


# -- the objective and the held-out number ------------------------------------------------------------------


def masked_cross_entropy(logits: Tensor, codes: Tensor, mask: Tensor, smoothing: float = 0.0) -> Tensor:
    """(b, h, w, k) logits, (b, h, w) codes, (b, h, w) bool mask -> mean nats over the masked codes of the batch
    (`smoothing`: with label smoothing). Nothing at an unmasked position, not even a non-finite logit, reaches
    the value."""
    return F.cross_entropy(logits.float()[mask], codes.long()[mask], label_smoothing=smoothing)


def masked_loss(model: nn.Module, codes: Tensor, labels: Tensor | None,
                smoothing: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """One training batch: hide codes by `draw_masks`, predict them through `model.forward`; the loss
    (`smoothing`: with label smoothing) and the training counterpart of the held-out number, the true bits
    per masked code, which smoothing leaves out."""
    b, h, w = codes.shape
    mask = rearrange(draw_masks(b, h * w, codes.device), "b (h w) -> b h w", h=h)
    logits = model(codes, labels, mask)  # (b, h, w, k)
    loss = masked_cross_entropy(logits, codes, mask, smoothing)
    nll = masked_cross_entropy(logits, codes, mask).detach() if smoothing else loss.detach()
    return loss, {"loss": loss.detach(), "bits_per_masked_code": nll / math.log(2)}


def masked_held_out(model: nn.Module, config: PriorConfig, batches: Iterable[tuple[Tensor, Tensor | None, Tensor]],
                    gather: Callable[[Tensor], Tensor]) -> dict[str, float]:
    """Test batches (codes, labels or None, index in the split) -> {"bits_per_masked_code": ...}.

    The mean, over every code hidden by `held_out_masks` in every test grid, of -log2 p(code | class, the grid's
    visible codes), each hidden code weighing the same (as in the training loss). It is NOT bits per code of the
    joint p(grid): it scores one-step predictions of hidden codes, averaged over the masking schedule, and cannot be
    compared with the autoregressive priors' `bits_per_code`. It is a fixed function of the weights and the test set
    (the same masks at every evaluation, whatever the batch size or number of processes), so it selects the best
    checkpoint and drives early stopping; its training counterpart, logged under the same name, uses random masks.
    """
    h, sums = config.grid_height, []
    for codes, labels, index in batches:
        masks = held_out_masks(index, config.seq_len).to(codes.device)  # (b, m, t)
        nll = torch.zeros(codes.shape[0], device=codes.device)
        for j in range(masks.shape[1]):
            mask = rearrange(masks[:, j], "b (h w) -> b h w", h=h)
            logits = model(codes, labels, mask)  # (b, h, w, k)
            per_code = F.cross_entropy(rearrange(logits.float(), "b h w k -> b k h w"), codes.long(), reduction="none")
            nll += torch.where(mask, per_code, 0.0).flatten(1).sum(1)
        counts = masks.flatten(1).sum(1).float()  # (b,)
        sums.append(gather(torch.stack([nll, counts], dim=1)).cpu())  # (b, 2), duplicates of even batches dropped
    nats, hidden = torch.cat(sums).double().sum(0).tolist()
    return {"bits_per_masked_code": bits(nats / hidden)}
