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


GUIDANCE = ("cfg_scale", "cfg_schedule")  # what `vqgen eval --adopt` records for a prior
# A setting replaces the baseline only with an FID this much lower: about one seed's spread of the FID at 1000
# samples (2-6 %), so that a tie does not trade the default away (2,000 MNIST digits: --cfg 1 scored 0.471 against
# 0.472 at 1.5, with class accuracy 0.81 against 0.93; docs/benchmarks.md, "Guidance adopted by measurement").
ADOPT_MARGIN = 0.05
# Nor does a setting that gives up class accuracy: guidance is there for the class, and a lower FID bought by
# drawing fewer images of the class asked for is not what a conditional prior's user wants (2,000 MNIST digits:
# --cfg 1 scored 0.446 against 0.554 at 1.5, with class accuracy 0.82 against 0.94). 0.05 is over three standard
# errors of the difference at 2 x 1000 samples.
ADOPT_CLASS_LOSS = 0.05


def check_adoptable(items: list[str] | None, given: dict[str, Any]) -> None:
    """--adopt records guidance only: refuse, in one line, a sweep of another setting or another sampling option
    given, whose best value the prior would not keep."""
    names = {f.name: name for name, f in sweepable().items()}
    swept = [item.partition("=")[0] for item in items or ()]
    other = [f"--sweep {name}" for name in swept if name not in ("cfg", "cfg-schedule")]
    other += [f"--{names[field]}" for field in given if field not in GUIDANCE]
    if other:
        raise VQGenError(f"--adopt records the guidance (cfg, cfg-schedule) only, got {', '.join(other)}: sweep "
                         "cfg and cfg-schedule alone, or drop --adopt")


def sample_mean(summary: dict[str, Any], key: str) -> float | None:
    """A measure of a setting's samples from its seeds summary: the mean over the seeds (a plain number as is),
    None where it was not scored."""
    value = summary["samples"].get(key)
    return value["mean"] if isinstance(value, dict) else value


def ineligible(summary: dict[str, Any], baseline: dict[str, Any], class_loss: float = ADOPT_CLASS_LOSS) -> str | None:
    """Why a setting's `summary` cannot be adopted beside the `baseline` setting's, in a few words; None when it can.
    Not eligible: samples that are near-copies of training images (in pixels) more often than held-out images are,
    or class accuracy more than `class_loss` below the baseline's. A setting scored without near-copies (a test
    split under 4 images) or without class accuracy counts as within."""
    copies, heldout = sample_mean(summary, "near_copies_pixels"), sample_mean(summary, "near_copies_heldout_pixels")
    if copies is not None and copies > heldout:
        return f"near-copies {copies:.3g} against held-out images' {heldout:.3g}"
    accuracy, least = sample_mean(summary, "class_accuracy"), sample_mean(baseline, "class_accuracy")
    if accuracy is not None and least is not None and accuracy < least - class_loss:
        return f"class accuracy {accuracy:.3g}, more than {class_loss:g} below {least:.3g}"
    return None


def adoptable(summaries: list[dict[str, Any]], margin: float = ADOPT_MARGIN,
              class_loss: float = ADOPT_CLASS_LOSS) -> int | None:
    """The setting `--adopt` takes, by index: the lowest mean in-domain FID among the eligible settings
    (`ineligible`), where it is more than `margin` below the first setting's (the baseline, else kept); None when
    none is eligible."""
    def fid(i: int) -> float:
        return sample_mean(summaries[i], "fid")

    fair = [i for i, summary in enumerate(summaries) if ineligible(summary, summaries[0], class_loss) is None]
    best = min(fair, key=fid, default=None)
    if best is not None and 0 in fair and fid(best) > (1 - margin) * fid(0):
        return 0
    return best
