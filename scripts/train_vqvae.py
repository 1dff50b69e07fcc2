"""Stage 1: train a VQ-VAE and dump the dataset's code grids; the same as `vqgen train vqvae`.

    python scripts/train_vqvae.py                              # built-in shapes, runs/default
    accelerate launch scripts/train_vqvae.py --data ./my_images --image-size 64 --run runs/mine
    python scripts/train_vqvae.py --run runs/mine --resume     # continue from the last saved state
    python scripts/train_vqvae.py --data ./photos --image-size 128 --preset 128   # the resnet trunk
"""

from __future__ import annotations

import argparse
import sys

from vqgen import cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return cli.build_parser().parse_args(["train", "vqvae", *(sys.argv[1:] if argv is None else argv)])


def main(argv: list[str] | None = None) -> int:
    return cli.main(["train", "vqvae", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
