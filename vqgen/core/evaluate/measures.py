"""Measures shared by both stages: code usage, PSNR, bits."""

from __future__ import annotations

import math

from torch import Tensor


def code_usage(counts: Tensor) -> dict[str, float]:
    """(k,) code counts -> usage fraction, perplexity and number of dead (unused) codes."""
    counts = counts.double()
    total = counts.sum()
    if total <= 0:
        return {"usage": 0.0, "perplexity": 0.0, "dead_codes": float(counts.numel())}
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    used = int((counts > 0).sum())
    return {
        "usage": used / counts.numel(),
        "perplexity": float(entropy.exp()),
        "dead_codes": float(counts.numel() - used),
    }


def psnr(mse: float, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB for an MSE measured on pixels in [0, peak]."""
    return float("inf") if mse <= 0 else 10.0 * math.log10(peak * peak / mse)


def bits(nats: float) -> float:
    return nats / math.log(2.0)


