"""One raster sampler for the autoregressive priors (Transformer, PixelCNN; the masked prior has
`stage2_prior.parallel`): temperature, top-k, top-p, classifier-free guidance, per-sample seeds.

A prior is sampled through `state = prior.start(labels, b)` then, for every raster position,
`logits, state = prior.step(state, codes, pos)` (`stage2_prior.contract.ARPrior`).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from stage2_prior.config import CFG_SCHEDULES, PriorConfig
from stage2_prior.contract import ARPrior, check_codes, check_labels
from vqgen.core.runtime.errors import VQGenError


def _check_filters(k: int, top_k: int | None, top_p: float | None) -> None:
    if top_k is not None and not 1 <= top_k <= k:
        raise VQGenError(f"top_k must be in [1, {k}], got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise VQGenError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """(b, k) -> (b, k): -inf outside the top-k (ties at the k-th value kept), then outside the nucleus.

    The nucleus is the smallest set of most likely codes whose probability reaches `top_p`.
    """
    _check_filters(logits.shape[-1], top_k, top_p)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (b, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (b, k)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # the most likely code always has 0 before it
        drop = torch.zeros_like(order, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def inverse_cdf(probs: Tensor, uniforms: Tensor) -> Tensor:
    """(b, k) unnormalised probabilities, (b,) uniforms in [0, 1) -> (b,) codes; zero-mass codes never come out."""
    cdf = probs.cumsum(dim=-1)  # (b, k)
    target = uniforms[:, None] * cdf[:, -1:]  # (b, 1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


def seeded_uniforms(seeds: Tensor, t: int) -> Tensor:
    """(n,) int64 seeds -> (n, t) uniforms; row i comes from `seeds[i]` alone."""
    rows = [torch.rand(t, generator=torch.Generator().manual_seed(int(s))) for s in seeds.tolist()]
    return torch.stack(rows)  # (n, t)


def seeded_choice(weights: Tensor, seeds: Tensor) -> Tensor:
    """(n, k) unnormalised weights, (n,) int64 seeds -> (n,) indices drawn with those weights, row i from
    `seeds[i]` alone (a label or a cluster for sample i); zero-weight indices never come out."""
    uniforms = seeded_uniforms(seeds.cpu(), 1)[:, 0].double().to(weights.device)
    return inverse_cdf(weights.double(), uniforms)


def choose_codes(logits: Tensor, uniforms: Tensor, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None) -> Tensor:
    """(b, k) logits, (b,) uniforms -> (b,) codes: argmax for top_k=1, else the filtered softmax's inverse CDF."""
    if top_k == 1:  # exactly greedy, ties included
        return logits.argmax(dim=-1)
    probs = F.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    return inverse_cdf(probs, uniforms)


def guide(logits: Tensor, cfg_scale: float | Tensor) -> Tensor:
    """(2b, k) conditional rows then null-label rows -> (b, k) guided logits u + s * (c - u); s is one scale
    or a (b, 1) scale per row."""
    cond, uncond = logits.float().chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def guidance_scales(cfg_scale: float, schedule: str, draws: int) -> list[float]:
    """The guidance scale at each of a sample's `draws` (raster positions, or a masked prior's steps):
    `cfg_scale` at every one ("constant"), or rising linearly from 1 at the first to `cfg_scale` at the last
    ("linear"; one draw: `cfg_scale`)."""
    if schedule == "constant" or draws == 1:
        return [cfg_scale] * draws
    return [1 + (cfg_scale - 1) * i / (draws - 1) for i in range(draws)]


def check_draw(cfg: PriorConfig, n: int, labels: Tensor | None, temperature: float, top_k: int | None,
               top_p: float | None, cfg_scale: float, seeds: Tensor | None, cfg_schedule: str = "constant") -> None:
    """The checks every prior's sampler makes (raster and parallel): n, temperature, filters, guidance and its
    schedule, labels and per-sample seeds, each refused in one line naming the value."""
    if n < 1:
        raise VQGenError(f"n must be >= 1, got {n}")
    if not temperature > 0:
        raise VQGenError(f"temperature must be > 0, got {temperature}")
    _check_filters(cfg.codebook_size, top_k, top_p)
    if not cfg_scale >= 0:
        raise VQGenError(f"cfg_scale must be >= 0, got {cfg_scale}")
    if cfg_schedule not in CFG_SCHEDULES:
        raise VQGenError(f"cfg_schedule must be one of {', '.join(CFG_SCHEDULES)}, got {cfg_schedule!r}")
    if labels is not None:
        check_labels(labels, n, cfg)
    if seeds is not None and (seeds.shape != (n,) or seeds.dtype.is_floating_point):
        raise VQGenError(f"seeds must be an integer tensor of shape ({n},), got {seeds.dtype} {tuple(seeds.shape)}")


def _check_sample_args(prior: ARPrior, n: int, labels: Tensor | None, temperature: float, top_k: int | None,
                       top_p: float | None, cfg_scale: float, seeds: Tensor | None, prefix: Tensor | None,
                       prefix_len: int, batch_size: int | None, keep: Tensor | None = None,
                       cfg_schedule: str = "constant") -> None:
    cfg = prior.config
    h, w, t = cfg.grid_height, cfg.grid_width, cfg.seq_len
    if not callable(getattr(prior, "start", None)):  # the masked prior: no raster order to sample in
        raise VQGenError(f"raster sampling needs an autoregressive prior, got a {type(cfg).__name__} "
                         "(decode it with stage2_prior.parallel.fill_masked)")
    check_draw(cfg, n, labels, temperature, top_k, top_p, cfg_scale, seeds, cfg_schedule)
    if not 0 <= prefix_len <= t:
        raise VQGenError(f"prefix_len must be in [0, {t}], got {prefix_len}")
    if prefix_len > 0 and prefix is None:
        raise VQGenError(f"prefix_len is {prefix_len} but no prefix was given")
    if keep is not None:
        if prefix is None or prefix_len:
            raise VQGenError("keep marks which codes of prefix to keep: give prefix with it, and no prefix_len")
        if keep.shape != (n, h, w) or keep.dtype != torch.bool:
            raise VQGenError(f"keep must be a bool tensor of shape ({n}, {h}, {w}), got {keep.dtype} "
                             f"{tuple(keep.shape)}")
    if prefix is not None:
        if prefix.shape != (n, h, w):
            raise VQGenError(f"prefix must have shape ({n}, {h}, {w}), got {tuple(prefix.shape)}")
        check_codes(torch.where(keep, prefix, 0) if keep is not None else prefix, cfg)  # only kept codes matter
    if batch_size is not None and batch_size < 1:
        raise VQGenError(f"batch_size must be >= 1, got {batch_size}")


def check_sampling(prior: ARPrior, n: int, labels: Tensor | None = None, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None, cfg_scale: float = 1.0,
                   cfg_schedule: str = "constant") -> None:
    """Refuse bad sampling options before anything is drawn (or written), as `sample_codes` would."""
    _check_sample_args(prior, n, labels, temperature, top_k, top_p, cfg_scale, None, None, 0, None,
                       cfg_schedule=cfg_schedule)


def _sample_chunk(prior: ARPrior, labels: Tensor | None, uniforms: Tensor, known: Tensor | None,
                  keep: Tensor | None, cfg_scale: float, choose: Callable[[Tensor, Tensor], Tensor],
                  cfg_schedule: str = "constant") -> Tensor:
    """(b, t) uniforms, (b, t) known codes kept where (b, t) `keep` -> (b, t) codes, one prior step per position.

    A kept position is still fed through the prior (later codes see it), but its code is given; the guidance
    scale at position p is `guidance_scales(cfg_scale, cfg_schedule, t)[p]`."""
    b, t = uniforms.shape
    guided = labels is not None and cfg_scale != 1.0
    if guided:  # conditional rows then null rows, in one batch
        labels = torch.cat([labels, torch.full_like(labels, prior.config.num_classes)])
    state = prior.start(labels, 2 * b if guided else b)
    codes = torch.zeros(b, t, dtype=torch.long, device=uniforms.device) if known is None else known.clone()
    # which positions anyone draws, and which everyone keeps, read once: no device sync in the loop
    drawn = [True] * t if keep is None else (~keep).any(0).tolist()
    partly = [False] * t if keep is None else keep.any(0).tolist()
    scales = guidance_scales(cfg_scale, cfg_schedule, t)
    for pos in range(t):
        logits, state = prior.step(state, torch.cat([codes, codes]) if guided else codes, pos)  # (b or 2b, k)
        if drawn[pos]:
            chosen = choose(guide(logits, scales[pos]) if guided else logits, uniforms[:, pos])
            codes[:, pos] = torch.where(keep[:, pos], codes[:, pos], chosen) if partly[pos] else chosen
    return codes


def sample_codes(prior: ARPrior, n: int, *, labels: Tensor | None = None, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, cfg_scale: float = 1.0,
                 cfg_schedule: str = "constant", seeds: Tensor | None = None, prefix: Tensor | None = None,
                 prefix_len: int = 0, keep: Tensor | None = None, batch_size: int | None = None,
                 progress: Callable[[int], None] | None = None) -> Tensor:
    """Draw n code grids (n, h, w) in raster order; sample i depends only on `seeds[i]` (default i).

    `top_k=1` is greedy; `cfg_scale != 1` with labels applies classifier-free guidance, at every position or
    rising to it along the raster order (`cfg_schedule`, `guidance_scales`); positions
    < `prefix_len` are copied from `prefix`, or, with `keep` (n, h, w) bool, the positions it marks (a code
    is drawn seeing the kept codes before it in raster order, not those after). `progress(m)` is called
    after each chunk of m samples.
    """
    _check_sample_args(
        prior, n, labels, temperature, top_k, top_p, cfg_scale, seeds, prefix, prefix_len, batch_size, keep,
        cfg_schedule
    )
    cfg = prior.config
    device = next(prior.parameters()).device
    seeds = torch.arange(n) if seeds is None else seeds.cpu()
    labels = None if labels is None else labels.to(device=device, dtype=torch.long)
    if prefix is not None:
        prefix = rearrange(prefix.to(device=device, dtype=torch.long), "n h w -> n (h w)")
        if keep is None:
            keep = torch.zeros(prefix.shape, dtype=torch.bool, device=device)
            keep[:, :prefix_len] = True
        else:
            keep = rearrange(keep.to(device), "n h w -> n (h w)")
    batch_size = n if batch_size is None else batch_size
    choose = partial(choose_codes, temperature=temperature, top_k=top_k, top_p=top_p)
    was_training = prior.training
    prior.eval()
    try:
        with torch.inference_mode():
            uniforms = seeded_uniforms(seeds, cfg.seq_len).to(device)  # (n, t)
            chunks = []
            for lo in range(0, n, batch_size):
                hi = min(lo + batch_size, n)
                chunks.append(_sample_chunk(
                    prior, None if labels is None else labels[lo:hi], uniforms[lo:hi],
                    None if prefix is None else prefix[lo:hi], None if keep is None else keep[lo:hi], cfg_scale,
                    choose, cfg_schedule,
                ))
                if progress is not None:
                    progress(hi - lo)
    finally:
        prior.train(was_training)
    return rearrange(torch.cat(chunks), "n (h w) -> n h w", h=cfg.grid_height)
