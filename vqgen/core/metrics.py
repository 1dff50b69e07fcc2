"""Metrics shared by both stages, and the run's JSONL log."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from vqgen.core.errors import VQGenError


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


class JsonlLog:
    """Appends one JSON object per line; the run's metric history across resumes."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk, say: one line naming the log
            raise VQGenError(f"cannot write {self.path}: {err.strerror or err}") from None

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash mid-write
                continue
        return records
