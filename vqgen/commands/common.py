"""What every command does with its options: integer floors named by flag, the sampling options checked."""

from __future__ import annotations

import argparse
import dataclasses

from stage2_prior.config import PriorConfig, SamplingConfig
from vqgen.arguments import flag, given_options
from vqgen.core.runtime.errors import VQGenError


def at_least(args: argparse.Namespace, lowest: int, *names: str) -> None:
    """Refuse an integer option below `lowest`, naming its flag: `--n must be >= 1, got 0`."""
    for name in names:
        if getattr(args, name) < lowest:
            raise VQGenError(f"--{name.replace('_', '-')} must be >= {lowest}, got {getattr(args, name)}")


def sampling_options(args: argparse.Namespace) -> SamplingConfig:
    """The sampling options of the parsed command line, checked."""
    return SamplingConfig(**given_options(args, SamplingConfig))


def as_flags(config) -> dict:
    """A config's values under the names of their command-line options (`cfg_scale` as `cfg`)."""
    return {flag(f).replace("-", "_"): getattr(config, f.name) for f in dataclasses.fields(config)}


def smoothing_warning(prior: PriorConfig, sampling: SamplingConfig) -> str | None:
    """A prior trained with label smoothing puts about that share of every draw on random codes: one line
    saying so when neither --top-k nor --top-p cuts them off (measured: docs/benchmarks.md, "Regularising the
    prior on little data")."""
    smoothing = prior.label_smoothing
    if not smoothing or sampling.top_k is not None or sampling.top_p is not None:
        return None
    return (f"this prior was trained with --label-smoothing {smoothing:g}, so about {smoothing:.0%} of its draws "
            "are random codes; sample with --top-k (e.g. 16) to cut them off")
