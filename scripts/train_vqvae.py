"""Stage 1: train a VQ-VAE and dump the dataset's code grids.

    python scripts/train_vqvae.py                              # built-in shapes, runs/default
    accelerate launch scripts/train_vqvae.py --data ./my_images --image-size 64 --run runs/mine
    python scripts/train_vqvae.py --run runs/mine --resume     # continue from the last saved state
    python scripts/train_vqvae.py --data ./photos --image-size 128 --preset 128   # the resnet trunk
"""

from __future__ import annotations

import argparse
import sys

from stage1_vqvae.model import VQVAEConfig
from stage1_vqvae.train import PRESETS, TRAIN_DEFAULTS, train_from_options
from vqgen.arguments import Parser, add_config_options, exit_code, given_options
from vqgen.core.data.images import DataConfig
from vqgen.core.trainer import TrainConfig

MODEL_FROM_DATA = ("in_channels", "image_height", "image_width")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/default", help="run directory (default: runs/default)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last saved state")
    parser.add_argument("--overwrite", action="store_true", help="replace the run's trained VQ-VAE")
    parser.add_argument("--no-encode", action="store_true", help="skip dumping the code grids at the end")
    parser.add_argument("--preset", choices=tuple(PRESETS),
                        help=f"model options for an image side ({' | '.join(PRESETS)}), filling only the model "
                             "options not given (default: none, the sized defaults)")
    add_config_options(parser, DataConfig, title="data")
    add_config_options(parser, TrainConfig, title="training", defaults=TRAIN_DEFAULTS)
    add_config_options(parser, VQVAEConfig, skip=MODEL_FROM_DATA, title="model")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_code(lambda: train_from_options(
        args.run, given_options(args, DataConfig), given_options(args, TrainConfig),
        given_options(args, VQVAEConfig, skip=MODEL_FROM_DATA), resume=args.resume, encode=not args.no_encode,
        overwrite=args.overwrite, preset=args.preset,
    ))


if __name__ == "__main__":
    sys.exit(main())
