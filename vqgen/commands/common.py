"""What every command does with its options: integer floors named by flag, the sampling options checked."""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING

from stage2_prior.config import PriorConfig, SamplingConfig
from vqgen.arguments import flag, given_options
from vqgen.core.runtime.errors import VQGenError

if TYPE_CHECKING:
    from rich.console import Console

    from vqgen.run import Run


def at_least(args: argparse.Namespace, lowest: int, *names: str) -> None:
    """Refuse an integer option below `lowest`, naming its flag: `--n must be >= 1, got 0` (one left out, None,
    passes)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < lowest:
            raise VQGenError(f"--{name.replace('_', '-')} must be >= {lowest}, got {value}")


def guidance_flags(sampling: SamplingConfig) -> str:
    """"--cfg 1.5 --cfg-schedule constant": a setting's guidance as the options that ask for it."""
    return f"--cfg {sampling.cfg_scale:g} --cfg-schedule {sampling.cfg_schedule}"


def sampling_options(args: argparse.Namespace) -> SamplingConfig:
    """The sampling options of the parsed command line, checked."""
    return SamplingConfig(**given_options(args, SamplingConfig))


def guidance_note(run: Run, given: SamplingConfig) -> str | None:
    """One line where the options leave guidance to the prior and the prior has its own (`vqgen eval --adopt`),
    or had one that its weights have outgrown."""
    left = [f"--{name}" for name, value in (("cfg", given.cfg_scale), ("cfg-schedule", given.cfg_schedule))
            if value is None]
    if not left:
        return None
    if run.stale_adoption:
        return (f"[bold yellow]warning:[/] {run.layout.prior.sampling} was adopted for other weights of this prior "
                f"(trained since) and is not used: {' and '.join(left)} take the plain default; adopt again with "
                "`vqgen eval --samples 1000 --seeds 2 --adopt`")
    if run.adopted is None:
        return None
    used = run.sampling(given)
    return (f"guidance {guidance_flags(used)}: {' and '.join(left)} as adopted for this prior "
            f"(why: {run.layout.prior.sampling} or `vqgen info`)")


def prior_sampling(run: Run, given: list[SamplingConfig], console: Console) -> list[SamplingConfig]:
    """The options a command draws with: each of `given` with the prior's guidance filled in (`Run.sampling`),
    saying once on `console` where the prior's adopted guidance applies and where label smoothing asks for a
    filter."""
    notes = [guidance_note(run, sampling) for sampling in given]
    warnings = [smoothing_warning(run.prior.config, sampling) for sampling in given]
    for line in dict.fromkeys(notes + [w and f"[bold yellow]warning:[/] {w}" for w in warnings]):
        if line:
            console.print(line)
    return [run.sampling(sampling) for sampling in given]


def as_flags(config) -> dict:
    """A config's values under the names of their command-line options (`cfg_scale` as `cfg`)."""
    return {flag(f).replace("-", "_"): getattr(config, f.name) for f in dataclasses.fields(config)}


def smoothing_warning(prior: PriorConfig, sampling: SamplingConfig) -> str | None:
    """A prior trained with label smoothing E spreads that share of every prediction over all K codes, so about E
    of its draws are random codes: one line saying so when neither --top-k nor --top-p cuts them off. The nucleus
    at 1 - E leaves out about that share; whether it then copies training images is data's to say (measured:
    docs/benchmarks.md, "Label smoothing at the current defaults")."""
    smoothing = prior.label_smoothing
    if not smoothing or sampling.top_k is not None or sampling.top_p is not None:
        return None
    return (f"this prior was trained with --label-smoothing {smoothing:g}, so about {smoothing:.0%} of its draws "
            f"are random codes; --top-p {1 - smoothing:g} cuts them off, and `vqgen eval --samples 1000` says "
            "whether the samples then copy training images")
