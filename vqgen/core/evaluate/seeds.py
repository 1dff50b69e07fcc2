"""The same measures over several sampling seeds: each number's mean and spread (`aggregate_seeds`), and
whether two settings differ by more than that spread, from their summaries (`compare_settings`, Welch) or
seed by seed when both drew the same seeds (`compare_paired`). Pure functions on nested dicts of numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vqgen.core.runtime.errors import VQGenError

# Student's t, two-sided 95 %: the 0.975 quantile by degrees of freedom (scipy.stats.t.ppf); between rows,
# the row below (fewer degrees of freedom: a wider interval)
_T975 = {1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445, 5: 2.570582, 6: 2.446912, 7: 2.364624,
         8: 2.306004, 9: 2.262157, 10: 2.228139, 11: 2.200985, 12: 2.178813, 13: 2.160369, 14: 2.144787,
         15: 2.13145, 16: 2.119905, 17: 2.109816, 18: 2.100922, 19: 2.093024, 20: 2.085963, 21: 2.079614,
         22: 2.073873, 23: 2.068658, 24: 2.063899, 25: 2.059539, 26: 2.055529, 27: 2.051831, 28: 2.048407,
         29: 2.04523, 30: 2.042272, 40: 2.021075, 60: 2.000298, 120: 1.97993, math.inf: 1.959964}


def t975(df: float) -> float:
    """The two-sided 95 % critical value of Student's t at df degrees of freedom (rounded down to a row)."""
    if not df >= 1:
        raise VQGenError(f"degrees of freedom must be >= 1, got {df!r}")
    return _T975[max(row for row in _T975 if row <= df)]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def aggregate_seeds(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-seed metric dicts (nested dicts allowed) -> the same keys, each number now
    {"mean", "std" (sample standard deviation; None for one seed), "n"} over the seeds that have it."""
    if not runs:
        raise VQGenError("aggregating seeds needs at least one run's metrics, got none")
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for run in runs for k in run):
        values = [run[key] for run in runs if key in run]
        if all(isinstance(v, Mapping) for v in values):
            out[key] = aggregate_seeds(values)
        elif all(_is_number(v) for v in values):
            t = torch.tensor([float(v) for v in values], dtype=torch.float64)
            out[key] = {"mean": float(t.mean()), "std": float(t.std()) if len(t) > 1 else None, "n": len(t)}
    return out


def _is_summary(v: Any) -> bool:
    return isinstance(v, Mapping) and set(v) == {"mean", "std", "n"}


def compare_settings(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Two `aggregate_seeds` results -> for each number in both: {"difference" (b - a), "spread", "exceeds"}.

    spread: the half-width of Welch's 95 % interval of the difference, t975(df) sqrt(s_a²/n_a + s_b²/n_b);
    exceeds: |difference| > spread (None, like spread, when a side has a single seed)."""
    out: dict[str, Any] = {}
    for key in a:
        if key not in b:
            continue
        x, y = a[key], b[key]
        if _is_summary(x) and _is_summary(y):
            out[key] = _difference(x, y)
        elif isinstance(x, Mapping) and isinstance(y, Mapping) and not (_is_summary(x) or _is_summary(y)):
            out[key] = compare_settings(x, y)
    return out


def compare_paired(runs_a: Sequence[Mapping[str, Any]], runs_b: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-seed metric dicts of two settings drawn with the same seeds, in the same order -> for each number
    in all of them: {"difference" (mean of b - a), "spread" (t975(n-1) std / sqrt(n) of the per-seed
    differences), "exceeds"}. The same seed draws the same random numbers under both settings, so the
    pairs share much of their noise and this sees smaller differences than `compare_settings`."""
    if len(runs_a) != len(runs_b) or not runs_a:
        raise VQGenError(f"a paired comparison needs the same seeds on both sides, got {len(runs_a)} and "
                         f"{len(runs_b)} runs")
    return _paired(runs_a, runs_b)


def _paired(runs_a: Sequence[Mapping[str, Any]], runs_b: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in runs_a[0]:
        xs, ys = [r.get(key) for r in runs_a], [r.get(key) for r in runs_b]
        if all(isinstance(v, Mapping) for v in xs + ys):
            out[key] = _paired(xs, ys)
        elif all(_is_number(v) for v in xs + ys):
            d = aggregate_seeds([{"d": float(y) - float(x)} for x, y in zip(xs, ys)])["d"]
            if d["std"] is None:
                out[key] = {"difference": d["mean"], "spread": None, "exceeds": None}
            else:
                spread = t975(d["n"] - 1) * d["std"] / math.sqrt(d["n"])
                out[key] = {"difference": d["mean"], "spread": spread,
                            "exceeds": abs(d["mean"]) > spread if spread > 0 else d["mean"] != 0}
    return out


def _difference(x: Mapping[str, Any], y: Mapping[str, Any]) -> dict[str, Any]:
    diff = y["mean"] - x["mean"]
    if x["std"] is None or y["std"] is None:
        return {"difference": diff, "spread": None, "exceeds": None}
    va, vb = x["std"] ** 2 / x["n"], y["std"] ** 2 / y["n"]
    if va + vb == 0:
        return {"difference": diff, "spread": 0.0, "exceeds": diff != 0}
    df = (va + vb) ** 2 / (va ** 2 / (x["n"] - 1) + vb ** 2 / (y["n"] - 1))
    spread = t975(df) * math.sqrt(va + vb)
    return {"difference": diff, "spread": spread, "exceeds": abs(diff) > spread}
