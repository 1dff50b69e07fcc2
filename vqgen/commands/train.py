"""`vqgen train vqvae|prior`: each stage's one entry point with the options given on the command line."""

from __future__ import annotations

import argparse

from stage1_vqvae.config import GANConfig, VQVAEConfig
from stage1_vqvae.train import train_vqvae
from stage2_prior.train import train_prior
from vqgen.arguments import VQVAE_FROM_DATA, given_options, given_prior_options
from vqgen.core.data.config import DataConfig
from vqgen.core.training.config import TrainConfig


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
