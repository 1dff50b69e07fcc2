"""Sample quality you can compare: the same measures over several sampling seeds (mean and spread), and a
sweep over sampling settings, each setting scored with the same seeds so that two settings share their
luck and are compared pair by pair (`vqgen.core.evaluate.seeds.compare_paired`).

    --seeds 3 --sweep cfg=1,1.5,2 temperature=0.9,1   -> 6 settings x 3 seeds; the first setting is the baseline
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from stage2_prior.config import SamplingConfig
from vqgen.arguments import flag
from vqgen.core.runtime.errors import VQGenError

MIN_SAMPLES = 6  # the k-NN measures need more samples than their k (5 for density and coverage)
# what a sweep's table shows of each setting, and which way is better (round trip: read beside the reconstructions')
SWEPT_MEASURES = (("fid", "FID ↓"), ("kid", "KID ↓"), ("precision", "precision ↑"), ("recall", "recall ↑"),
                  ("class_accuracy", "class acc. ↑"), ("code_round_trip", "round trip"),
                  ("near_copies_pixels", "copies ↓"))  # copies beside the held-out copies that follow


def sweepable() -> dict[str, dataclasses.Field]:
    """The sampling settings a sweep may vary, by their option name: cfg, temperature, top-k, top-p,
    cfg-schedule, steps, choice-noise."""
    return {flag(f): f for f in dataclasses.fields(SamplingConfig)}


def parse_sweep(items: list[str], base: SamplingConfig) -> list[SamplingConfig]:
    """["cfg=1,1.5", "temperature=0.9,1"] -> every combination, as sampling configs on top of `base`, each
    checked now (one line naming a bad setting or value)."""
    fields = sweepable()
    axes: list[list[tuple[str, Any]]] = []
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise VQGenError(f"--sweep {item!r}: expected SETTING=V1,V2,... such as cfg=1,1.5,2")
        if name not in fields:
            raise VQGenError(f"--sweep {item!r}: unknown setting {name!r}; expected one of {', '.join(fields)}")
        field = fields[name]
        kind = str if field.metadata.get("choices") else float if "float" in str(field.type) else int
        try:
            axes.append([(field.name, kind(v)) for v in values.split(",")])
        except ValueError:
            raise VQGenError(f"--sweep {item!r}: {name} takes {kind.__name__} values, got {values!r}") from None
    if len({axis[0][0] for axis in axes}) != len(axes):
        raise VQGenError(f"--sweep names a setting twice: {' '.join(items)}")
    return [dataclasses.replace(base, **dict(combination)) for combination in itertools.product(*axes)]


def setting_label(sampling: SamplingConfig, varied: list[str]) -> str:
    """"cfg 1.5, temperature 0.9": the varied settings of one point of a sweep."""
    by_name = {f.name: name for name, f in sweepable().items()}
    return ", ".join(f"{by_name[name]} {getattr(sampling, name)}" for name in varied) or "default"


def varied_settings(settings: list[SamplingConfig]) -> list[str]:
    """The fields that differ between the settings of a sweep, in the config's order."""
    return [f.name for f in dataclasses.fields(SamplingConfig)
            if len({getattr(s, f.name) for s in settings}) > 1]


def option_names(fields: list[str]) -> str:
    """["cfg_scale", "temperature"] -> "cfg, temperature": as the options are called."""
    by_name = {f.name: name for name, f in sweepable().items()}
    return ", ".join(by_name[name] for name in fields)


def shown(summary: dict[str, Any] | float | None) -> str:
    """A seeds summary {"mean", "std", "n"} (or a plain number) as "0.123 ± 0.004"."""
    if summary is None:
        return ""
    if isinstance(summary, dict):
        mean, std = summary["mean"], summary["std"]
        return f"{mean:.4g}" + (f" ± {std:.2g}" if std is not None else "")
    return f"{summary:.4g}"
