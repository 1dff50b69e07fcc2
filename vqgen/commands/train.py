"""`vqgen train vqvae|prior`: each stage's one entry point with the options given on the command line."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from stage1_vqvae.config import GANConfig, VQVAEConfig
from stage1_vqvae.train import train_vqvae
from stage2_prior.config import ADOPT_CANDIDATES
from stage2_prior.registry import load_prior_config
from stage2_prior.train import little_data, train_prior
from vqgen.arguments import VQVAE_FROM_DATA, given_options, given_prior_options
from vqgen.cli import build_parser
from vqgen.commands.evaluate import cmd_eval
from vqgen.core.data.config import DataConfig
from vqgen.core.runtime.console import make_console
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.runtime.processes import process_state
from vqgen.core.store.codes import load_codes_meta
from vqgen.core.store.layout import RunLayout
from vqgen.core.training.config import TrainConfig

# After training a conditional prior on little data (under FEW_CODES training codes), `vqgen train prior` scores
# the guidance candidates as `vqgen eval --samples 1000 --seeds 2 --adopt` does and keeps the best for the prior:
# the best guidance there differs by dataset (docs/benchmarks.md, "Guidance adopted by measurement"). Not with
# fewer test images than ADOPT_MIN_TEST, whose FID could not tell the candidates apart by the 5 % margin.
ADOPT_SAMPLES, ADOPT_SEEDS, ADOPT_MIN_TEST = 1000, 2, 200


def cmd_train(args: argparse.Namespace) -> None:
    """`vqgen train vqvae|prior`: the stage's one entry point with the options given on the command line."""
    if args.stage == "vqvae":
        train_vqvae(args.run, given_options(args, DataConfig), given_options(args, TrainConfig),
                    given_options(args, VQVAEConfig, skip=VQVAE_FROM_DATA), gan=given_options(args, GANConfig),
                    preset=args.preset,
                    resume=args.resume, encode=not args.no_encode, overwrite=args.overwrite)
    else:
        train_prior(args.run, args.prior, given_options(args, TrainConfig), given_prior_options(args),
                    codes_dir=args.codes, labels=args.labels, resume=args.resume,
                    allow_vqvae_mismatch=args.allow_vqvae_mismatch, overwrite=args.overwrite)
        adopt_guidance(args)


def adoption_blocker(args: argparse.Namespace) -> str | None:
    """Why the freshly trained prior's guidance is not adopted now ("" where there is nothing to adopt: an
    unconditional prior, or one of FEW_CODES training codes or more), None where it is."""
    run = RunLayout(args.run)
    meta = load_codes_meta(Path(args.codes) if args.codes else run.codes)
    sizes = dict(meta.split_sizes)
    if not load_prior_config(run.prior).num_classes or not little_data(meta.distinct_train_codes):
        return ""
    if args.no_adopt:
        return "--no-adopt"
    if sizes["test"] < ADOPT_MIN_TEST:
        return f"{sizes['test']} test images, fewer than the {ADOPT_MIN_TEST} that tell the candidates apart"
    if process_state().num_processes > 1:
        return f"{process_state().num_processes} processes: it samples in one"
    return None


def adopt_guidance(args: argparse.Namespace) -> None:
    """Score the guidance candidates on the run's own data and keep the best for its prior, where that is due
    (`adoption_blocker`), else say in one line how to. A candidate refused or a failure here leaves the trained
    prior as it is and is said in one line: the training itself succeeded."""
    console = make_console(process_state().is_main_process)
    blocker = adoption_blocker(args)
    argv = ["eval", "--run", str(args.run), "--samples", str(ADOPT_SAMPLES), "--seeds", str(ADOPT_SEEDS), "--adopt"]
    command = shlex.join(["vqgen", *argv])
    candidates = f"{len(ADOPT_CANDIDATES)} guidances"
    if blocker:
        console.print(f"guidance: on little data the best one differs by dataset; not measured here "
                      f"({blocker}): `{command}` measures {candidates} on yours and keeps the best for this prior")
    if blocker is not None:
        return
    seeds = f"{ADOPT_SEEDS} seed{'s' * (ADOPT_SEEDS > 1)}"
    console.print(f"guidance: on little data the best one differs by dataset; scoring {candidates} on {ADOPT_SAMPLES} "
                  f"samples x {seeds} to keep the best for this prior (`{command}`; skip with --no-adopt)")
    try:
        cmd_eval(build_parser().parse_args(argv))
    except VQGenError as err:
        console.print(f"[bold yellow]warning:[/] guidance not adopted, the prior samples at the default: {err}")
