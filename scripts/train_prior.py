"""Stage 2: fit a prior over a run's code grids, autoregressive (GPT Transformer or gated PixelCNN) or masked
(MaskGIT: a bidirectional Transformer, decoded in parallel); the same as `vqgen train prior`.

    python scripts/train_prior.py                                  # transformer on runs/default/codes
    python scripts/train_prior.py --prior pixelcnn --run runs/mine --max-steps 5000
    python scripts/train_prior.py --prior masked --run runs/mine
    accelerate launch scripts/train_prior.py --run runs/mine --resume
"""

from __future__ import annotations

import argparse
import sys

from vqgen import cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return cli.build_parser().parse_args(["train", "prior", *(sys.argv[1:] if argv is None else argv)])


def main(argv: list[str] | None = None) -> int:
    return cli.main(["train", "prior", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
