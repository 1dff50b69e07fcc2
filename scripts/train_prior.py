"""Stage 2: fit a prior over a run's code grids: autoregressive (GPT Transformer or gated PixelCNN) or
masked (MaskGIT: a bidirectional Transformer, decoded in parallel).

    python scripts/train_prior.py                                  # transformer on runs/default/codes
    python scripts/train_prior.py --prior pixelcnn --run runs/mine --max-steps 5000
    python scripts/train_prior.py --prior masked --run runs/mine
    accelerate launch scripts/train_prior.py --run runs/mine --resume
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from stage2_prior.registry import PRIORS
from stage2_prior.train import TRAIN_DEFAULTS, train_from_options
from vqgen.arguments import Parser, add_config_options, exit_code, given_options
from vqgen.core.trainer import TrainConfig

FROM_CODES = ("codebook_size", "grid_height", "grid_width", "num_classes")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/default", help="run directory (default: runs/default)")
    parser.add_argument("--prior", default="transformer", choices=sorted(PRIORS),
                        help=f"which prior ({' | '.join(sorted(PRIORS))}; default: transformer)")
    parser.add_argument("--codes", default=None, help="codes folder (default: RUN/codes)")
    parser.add_argument("--resume", action="store_true", help="continue from the prior's last saved state")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--conditional", dest="labels", action="store_const", const="yes",
                        help="condition on labels (error if the codes have none)")
    labels.add_argument("--unconditional", dest="labels", action="store_const", const="no",
                        help="ignore the codes' labels")
    parser.set_defaults(labels="auto")
    parser.add_argument("--overwrite", action="store_true", help="replace the run's trained prior")
    parser.add_argument("--allow-vqvae-mismatch", action="store_true",
                        help="train even if the codes came from another VQ-VAE than the run's")
    add_config_options(parser, TrainConfig, title="training", defaults=TRAIN_DEFAULTS)
    seen = set(FROM_CODES)
    for kind in PRIORS.values():
        add_config_options(parser, kind.config, skip=tuple(seen), title=f"{kind.name} prior")
        seen |= {f.name for f in dataclasses.fields(kind.config)}
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    given = {}
    for kind in PRIORS.values():
        given.update(given_options(args, kind.config, skip=FROM_CODES))
    return exit_code(lambda: train_from_options(
        args.run, args.prior, given_options(args, TrainConfig), given, codes_dir=args.codes, labels=args.labels,
        resume=args.resume, allow_vqvae_mismatch=args.allow_vqvae_mismatch, overwrite=args.overwrite,
    ))


if __name__ == "__main__":
    sys.exit(main())
