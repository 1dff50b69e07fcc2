"""Parallel decoding of a masked prior (MaskGIT, Chang et al. 2022): fill a grid's hidden codes in a few steps.

Each step predicts every hidden code at once, samples one code per position, scores each sampled code's
confidence (its probability, plus Gumbel noise that fades to zero over the steps) and keeps the most
confident ones, so that the number still hidden follows the cosine schedule (`masked_after_steps`); the
last step fills the rest. Sampling a whole grid, completing, inpainting and outpainting are this one call
with different `keep` masks.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from stage2_prior.config import DEFAULT_CHOICE_NOISE
from stage2_prior.contract import check_code_shape, check_codes
from stage2_prior.masked import MaskedConfig
from stage2_prior.sampling import check_draw, filter_logits, guidance_scales, guide, inverse_cdf
from vqgen.core.runtime.errors import VQGenError

DEFAULT_STEPS = 8  # MaskGIT decodes 16x16 grids in 8 steps; fewer for a sample with fewer codes to fill


def masked_after_steps(n_masked: int, steps: int) -> list[int]:
    """Codes still hidden after each of `steps` steps, starting from `n_masked`: floor(n cos(pi/2 s/steps)),
    held so that every step reveals at least one code (and leaves one for each later step); the last is 0."""
    if steps < 1:
        raise VQGenError(f"steps must be >= 1, got {steps}")
    if steps > n_masked:
        raise VQGenError(f"steps is {steps} but there are only {n_masked} codes to fill (one per step at least)")
    left, out = n_masked, []
    for s in range(1, steps + 1):
        target = math.floor(n_masked * math.cos(math.pi / 2 * s / steps))
        left = min(left - 1, max(target, steps - s))
        out.append(left)
    return out


def gumbel(uniforms: Tensor) -> Tensor:
    """Uniforms in [0, 1) -> standard Gumbel noise, finite everywhere."""
    return -torch.log(-torch.log(uniforms.clamp(1e-20, 1 - 1e-7)))


def _check_fill_args(prior: nn.Module, n: int, codes: Tensor | None, keep: Tensor | None, labels: Tensor | None,
                     seeds: Tensor | None, steps: int | None, temperature: float, top_k: int | None,
                     top_p: float | None, cfg_scale: float, choice_noise: float | None,
                     batch_size: int | None, cfg_schedule: str = "constant") -> None:
    cfg = getattr(prior, "config", None)
    if not isinstance(cfg, MaskedConfig):
        raise VQGenError(f"parallel decoding needs a masked prior, got a {type(cfg).__name__}")
    h, w = cfg.grid_height, cfg.grid_width
    check_draw(cfg, n, labels, temperature, top_k, top_p, cfg_scale, seeds, cfg_schedule)
    if steps is not None and steps < 1:
        raise VQGenError(f"steps must be >= 1, got {steps}")
    if choice_noise is not None and not (choice_noise >= 0 and math.isfinite(choice_noise)):
        raise VQGenError(f"choice_noise must be a number >= 0, got {choice_noise}")
    if batch_size is not None and batch_size < 1:
        raise VQGenError(f"batch_size must be >= 1, got {batch_size}")
    if (codes is None) != (keep is None):
        raise VQGenError("codes and keep go together (keep says which codes to keep), got only "
                         f"{'codes' if keep is None else 'keep'}")
    if keep is None:
        if steps is not None and steps > h * w:
            raise VQGenError(f"steps is {steps} but a {h}x{w} grid has only {h * w} codes to fill")
        return
    if keep.shape != (n, h, w) or keep.dtype != torch.bool:
        raise VQGenError(f"keep must be a bool tensor of shape ({n}, {h}, {w}), got {keep.dtype} {tuple(keep.shape)}")
    if codes.shape != (n, h, w):
        raise VQGenError(f"codes must have shape ({n}, {h}, {w}), got {tuple(codes.shape)}")
    check_code_shape(codes, cfg)
    check_codes(torch.where(keep.to(codes.device), codes, 0), cfg)  # only the kept codes need be codes
    to_fill = (~keep).flatten(1).sum(1)  # (n,)
    fewest = int(to_fill.argmin())
    if int(to_fill[fewest]) == 0:
        raise VQGenError(f"keep keeps every code of sample {fewest}: nothing to fill")
    if steps is not None and steps > int(to_fill[fewest]):
        raise VQGenError(f"steps is {steps} but sample {fewest} has only {int(to_fill[fewest])} codes to fill "
                         "(one per step at least)")


def check_filling(prior: nn.Module, n: int, labels: Tensor | None = None, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, cfg_scale: float = 1.0,
                  cfg_schedule: str = "constant", steps: int | None = None,
                  choice_noise: float | None = None) -> None:
    """Refuse bad sampling options before anything is drawn (or written), as `fill_masked` would."""
    _check_fill_args(prior, n, None, None, labels, None, steps, temperature, top_k, top_p, cfg_scale,
                     choice_noise, None, cfg_schedule)


def _fill_chunk(prior: nn.Module, codes: Tensor, masked: Tensor, labels: Tensor | None, uniforms: Tensor,
                left: Tensor, noise: Tensor, scales: Tensor, temperature: float, top_k: int | None,
                top_p: float | None) -> Tensor:
    """(b, t) codes, (b, t) bool hidden, (b, 2, S, t) uniforms (sampling, confidence noise), (b, S) codes left
    hidden after each step, (b, S) noise scale and (b, S) guidance scale per step -> (b, t) codes with nothing
    hidden."""
    cfg = prior.config
    b, t = codes.shape
    guided = labels is not None and bool((scales != 1.0).any())
    if guided:  # conditional rows then null rows, in one batch
        labels = torch.cat([labels, torch.full_like(labels, cfg.num_classes)])
    for s in range(left.shape[1]):
        grid = rearrange(codes, "b (h w) -> b h w", w=cfg.grid_width)
        hidden = rearrange(masked, "b (h w) -> b h w", w=cfg.grid_width)
        if guided:
            grid, hidden = torch.cat([grid, grid]), torch.cat([hidden, hidden])
        logits = rearrange(prior(grid, labels, hidden), "b h w k -> (b h w) k")  # (b*t or 2*b*t, k)
        logits = guide(logits, scales[:, s].repeat_interleave(t)[:, None]) if guided else logits.float()  # (b*t, k)
        probs = F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
        if top_k == 1:  # exactly greedy, ties included
            sampled = probs.argmax(dim=-1)
        else:
            sampled = inverse_cdf(probs, rearrange(uniforms[:, 0, s], "b t -> (b t)"))  # (b*t,)
        chosen = rearrange(probs.gather(1, sampled[:, None]), "(b t) 1 -> b t", b=b)
        confidence = chosen.clamp_min(1e-30).log() + noise[:, s, None] * gumbel(uniforms[:, 1, s])  # (b, t)
        confidence = confidence.masked_fill(~masked, math.inf)  # a known code is never hidden again
        ranks = confidence.argsort(dim=1, stable=True).argsort(dim=1)  # (b, t): 0 for the least confident
        still = ranks < left[:, s, None]  # the least confident hidden codes stay hidden
        codes = torch.where(masked & ~still, rearrange(sampled, "(b t) -> b t", b=b), codes)
        masked = still
    return codes


def fill_masked(prior: nn.Module, n: int, *, codes: Tensor | None = None, keep: Tensor | None = None,
                labels: Tensor | None = None, seeds: Tensor | None = None, steps: int | None = None,
                temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                cfg_scale: float = 1.0, cfg_schedule: str = "constant", choice_noise: float | None = None,
                batch_size: int | None = None, progress: Callable[[int], None] | None = None) -> Tensor:
    """Fill n grids (n, h, w) by parallel decoding; codes where `keep` (n, h, w) is True are kept as given
    (no keep: every code is drawn). Sample i depends only on `seeds[i]` (default i) and its own inputs.

    `steps` (default: 8, or the codes to fill when fewer) decoding steps per sample; `temperature`, `top_k`
    (1: greedy), `top_p` shape each code's distribution; `cfg_scale != 1` with labels applies classifier-free
    guidance, at every step or rising to it over the steps (`cfg_schedule`, `guidance_scales`); `choice_noise`
    (default `DEFAULT_CHOICE_NOISE`) scales the Gumbel noise on the confidences (0: always the most probable
    first; larger: a more random order). `progress(m)` is called after each chunk of m = `batch_size`
    (default n) samples.
    """
    _check_fill_args(prior, n, codes, keep, labels, seeds, steps, temperature, top_k, top_p, cfg_scale,
                     choice_noise, batch_size, cfg_schedule)
    choice_noise = DEFAULT_CHOICE_NOISE if choice_noise is None else choice_noise
    cfg = prior.config
    t = cfg.seq_len
    device = next(prior.parameters()).device
    seeds = torch.arange(n) if seeds is None else seeds.cpu()
    labels = None if labels is None else labels.to(device=device, dtype=torch.long)
    if keep is None:
        keep, codes = torch.zeros(n, t, dtype=torch.bool), torch.zeros(n, t, dtype=torch.long)
    else:
        keep, codes = rearrange(keep.cpu(), "n h w -> n (h w)"), rearrange(codes.cpu().long(), "n h w -> n (h w)")
        codes = torch.where(keep, codes, 0)
    to_fill = t - keep.sum(1)  # (n,)
    per_sample = [steps or min(DEFAULT_STEPS, int(m)) for m in to_fill]
    batch_size = n if batch_size is None else batch_size
    was_training = prior.training
    prior.eval()
    try:
        with torch.inference_mode():
            chunks = []
            for lo in range(0, n, batch_size):
                hi = min(lo + batch_size, n)
                span = max(per_sample[lo:hi])  # the chunk's steps; a sample with fewer has nothing left after its own
                left = torch.zeros(hi - lo, span, dtype=torch.long)
                noise = torch.zeros(hi - lo, span)
                scales = torch.ones(hi - lo, span)
                uniforms = torch.zeros(hi - lo, 2, span, t)
                for row, i in enumerate(range(lo, hi)):
                    s_i = per_sample[i]
                    left[row, :s_i] = torch.tensor(masked_after_steps(int(to_fill[i]), s_i))
                    noise[row, :s_i] = choice_noise * (1 - torch.arange(1, s_i + 1) / s_i)
                    scales[row, :s_i] = torch.tensor(guidance_scales(cfg_scale, cfg_schedule, s_i))
                    gen = torch.Generator().manual_seed(int(seeds[i]))
                    uniforms[row, :, :s_i] = torch.rand(2, s_i, t, generator=gen)
                chunks.append(_fill_chunk(
                    prior, codes[lo:hi].to(device), ~keep[lo:hi].to(device),
                    None if labels is None else labels[lo:hi], uniforms.to(device), left.to(device),
                    noise.to(device), scales.to(device), temperature, top_k, top_p,
                ))
                if progress is not None:
                    progress(hi - lo)
    finally:
        prior.train(was_training)
    return rearrange(torch.cat(chunks), "n (h w) -> n h w", h=cfg.grid_height)
