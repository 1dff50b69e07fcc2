"""`vqgen`: train both stages; sample, complete, inpaint, outpaint, reconstruct, encode, info, eval and report on
a trained run; export and push it.

Argument parsing only: `vqgen.commands` does the work (importing torch only then).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from stage2_prior.config import SamplingConfig
from vqgen.arguments import (
    Parser,
    add_config_options,
    add_prior_training_options,
    add_vqvae_training_options,
    exit_code,
)
from vqgen.core.data.config import DataConfig

EXAMPLES = {
    "vqvae": "vqgen train vqvae                                   # built-in shapes, runs/default\n"
             "  vqgen train vqvae --data ./my_images --image-size 64 --run runs/mine\n"
             "  vqgen train vqvae --run runs/mine --resume            # continue from the last saved state\n"
             "  vqgen train vqvae --data ./photos --image-size 128 --preset 128   # the resnet trunk\n"
             "  accelerate launch -m vqgen train vqvae --run runs/mine  # several processes",
    "prior": "vqgen train prior                                   # transformer on runs/default/codes\n"
             "  vqgen train prior --prior pixelcnn --run runs/mine --max-steps 5000\n"
             "  accelerate launch -m vqgen train prior --run runs/mine --resume",
    "sample": "vqgen sample --n 64\n  vqgen sample --run runs/mine --n 16 --label circle --cfg 2.0 --top-k 100\n"
              "  accelerate launch -m vqgen sample --n 1000 --batch-size 500",
    "reconstruct": "vqgen reconstruct --n 16\n  vqgen reconstruct --run runs/mine --split train",
    "encode": "vqgen encode\n  vqgen encode --run runs/mine --data ./more_images",
    "complete": "vqgen complete --n 8 --keep-rows 4",
    "inpaint": "vqgen inpaint --n 8 --box 8,8,24,24                   # a 16 px square hole in 8 test images\n"
               "  vqgen inpaint --images a.png b.png --mask hole.png --run runs/mine",
    "outpaint": "vqgen outpaint --n 8 --left 2 --right 2               # 2 code columns more on each side\n"
                "  vqgen outpaint --canvas 24,8 --n 4 --label circle      # a canvas 3 grids wide, from nothing",
    "info": "vqgen info --run runs/mine",
    "report": "vqgen report\n  vqgen report --run runs/mine --out ~/mine.html",
    "eval": "vqgen eval --run runs/mine\n  vqgen eval --run runs/mine --samples 1000 --cfg 2.0\n"
            "  vqgen eval --run runs/mine --samples 1000 --seeds 3 --sweep cfg=1,1.5,2 temperature=0.9,1",
    "export": "vqgen export --run runs/mine --to exported/mine\n"
              "  vqgen export --run runs/mine --to exported/mine --repo-id me/shapes-vqgen --overwrite\n"
              "  vqgen sample --run exported/mine --n 16",
    "push": "vqgen push --run runs/mine --repo-id me/shapes-vqgen\n"
            "  vqgen push --run runs/mine --repo-id me/shapes-vqgen --private\n"
            "  vqgen sample --run me/shapes-vqgen --n 16",
}


# the module of vqgen.commands that does each command's work
COMMAND_MODULES = {"train": "train", "sample": "sampling", "complete": "sampling", "reconstruct": "sampling",
                   "encode": "sampling", "inpaint": "edit", "outpaint": "edit", "info": "evaluate", "eval": "evaluate",
                   "report": "evaluate", "export": "share", "push": "share"}
RUN_HELP = ("run directory, exported model folder, or Hugging Face Hub repo id owner/name[@revision] (downloaded "
            "into the Hub's cache; outputs then go to outputs/NAME/) (default: runs/default)")


def _add_precision_option(p: argparse.ArgumentParser, scope: str = "") -> None:
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"),
                   help=f"autocast precision of the prior and decoder while sampling{scope} (no | bf16 | fp16; "
                        "default: no)")


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    add_config_options(p, SamplingConfig, title="sampling")
    p.add_argument("--seed", type=int, default=0, help="sample i is seeded by (seed, i) (default: 0)")
    p.add_argument("--allow-vqvae-mismatch", action="store_true",
                   help="use a prior trained on another VQ-VAE's codes")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="vqgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    def command(name: str, help_text: str, model: bool = True) -> argparse.ArgumentParser:
        """model: --run may also name an exported model folder or a Hub repo id (only read, never written)."""
        p = sub.add_parser(name, help=help_text, description=help_text, epilog="examples:\n  " + EXAMPLES[name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--run", default="runs/default",
                       help=RUN_HELP if model else "run directory (default: runs/default)")
        return p

    p = sub.add_parser("train", help="train stage 1 (the VQ-VAE, then its code dump) or stage 2 (a prior)",
                       description="train stage 1 (vqvae: the VQ-VAE, then the dump of the dataset's code grids) or "
                                   "stage 2 (prior: a prior over those grids) of a run")
    stages = p.add_subparsers(dest="stage", required=True, metavar="STAGE", parser_class=Parser)
    for stage, help_text, add_options in (
            ("vqvae", "stage 1: train a VQ-VAE on images and dump the dataset's code grids",
             add_vqvae_training_options),
            ("prior", "stage 2: fit a prior over a run's code grids: raster (GPT Transformer, gated PixelCNN) or "
             "masked (MaskGIT, decoded in parallel)",
             add_prior_training_options)):
        add_options(stages.add_parser(stage, help=help_text, description=help_text,
                                      epilog="examples:\n  " + EXAMPLES[stage],
                                      formatter_class=argparse.RawDescriptionHelpFormatter))

    p = command("sample", "draw images: prior -> codebook -> decoder")
    p.add_argument("--n", type=int, default=64, help="number of images (default: 64)")
    p.add_argument("--label", nargs="+", default=None,
                   help="class name(s) or id(s): one for all, or n (default: cycle through the classes)")
    p.add_argument("--unconditional", action="store_true",
                   help="sample a conditional prior without labels (its null class)")
    _add_sampling_options(p)
    p.add_argument("--batch-size", type=int, default=1000, help="samples per batch and process (default: 1000)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/samples/NNNN)")
    _add_precision_option(p)
    p.add_argument("--nrow", type=int, default=8, help="images per row of the grid (default: 8)")

    p = command("reconstruct", "originals over reconstructions, with MSE and PSNR")
    p.add_argument("--n", type=int, default=16, help="number of images (default: 16)")
    p.add_argument("--split", default="test", choices=("train", "test"),
                   help="which split's images (train | test; default: test)")
    p.add_argument("--out", default=None, help="output PNG (default: RUN/reconstructions.png)")

    p = command("encode", "(re)dump the code grids of a dataset with the run's VQ-VAE", model=False)
    p.add_argument("--batch-size", type=int, default=256, help="images per batch and process (default: 256)")
    add_config_options(p, DataConfig, title="data (default: the data the run was trained on)")

    p = command("complete", "keep the top rows of real code grids, sample the rest")
    p.add_argument("--n", type=int, default=8, help="number of test images (default: 8)")
    p.add_argument("--keep-rows", type=int, default=None, help="code rows kept (default: half the grid)")
    _add_sampling_options(p)
    p.add_argument("--out", default=None, help="output PNG (default: RUN/completions.png)")

    def edited_images(p: argparse.ArgumentParser) -> None:
        p.add_argument("--images", nargs="+", default=None,
                       help="image files of the run's size (default: the first --n test images of its data)")
        p.add_argument("--n", type=int, default=8, help="number of test images, when no --images (default: 8)")
        p.add_argument("--label", nargs="+", default=None,
                       help="class name(s) or id(s): one for all, or one per image (default: the test images' own, "
                            "or every class in turn)")

    p = command("inpaint", "redraw a hole anywhere in images (a box or a mask image), keeping every code outside it")
    edited_images(p)
    hole = p.add_mutually_exclusive_group(required=True)
    hole.add_argument("--box", default=None, help="the hole as x0,y0,x1,y1 in pixels (x1, y1 exclusive)")
    hole.add_argument("--mask", default=None, help="the hole as an image of the images' size: non-zero pixels are "
                                                   "redrawn (every code a masked pixel touches)")
    _add_sampling_options(p)
    p.add_argument("--out", default=None, help="output PNG (default: RUN/inpainted.png)")

    p = command("outpaint", "extend images past their borders by code rows and columns, or draw a canvas larger "
                            "than the training grid, window by window")
    edited_images(p)
    for side in ("top", "bottom", "left", "right"):
        p.add_argument(f"--{side}", type=int, default=0, help=f"code rows or columns to add at the {side} (default: 0)")
    p.add_argument("--canvas", default=None, help="W,H in codes: draw canvases of this size from nothing (--n of "
                                                  "them) instead of extending images")
    _add_sampling_options(p)
    p.add_argument("--out", default=None, help="output PNG (default: RUN/outpainted.png)")

    command("info", "a table of the run: configs, data, metrics")
    p = command("report", "one self-contained HTML page of the run: curves, code frequencies, reconstructions, "
                          "samples, configs (needs matplotlib)")
    p.add_argument("--out", default=None, help="the HTML file to write (default: RUN/report.html; for an exported "
                                               "model outputs/NAME/report.html)")
    p = command("eval", "recompute the test metrics of both stages; with --samples, how good samples are")
    p.add_argument("--samples", type=int, default=0,
                   help="draw this many samples and score them against the test split: in-domain FID and KID, "
                        "precision/recall, density/coverage, class accuracy, and the share of near-copies of "
                        "training images, beside real training images and their reconstructions (default: 0, no "
                        "samples)")
    p.add_argument("--seeds", type=int, default=1,
                   help="draw the samples this many times (seeds --seed, --seed + 1, ...) and report each measure's "
                        "mean and standard deviation (default: 1)")
    p.add_argument("--sweep", nargs="+", default=None, metavar="SETTING=V1,V2",
                   help="score every combination of these sampling settings (cfg, temperature, top-k, top-p, "
                        "cfg-schedule, steps, choice-noise), each with the same seeds, in one table of fidelity, "
                        "variety and near-copies")
    p.add_argument("--adopt", action="store_true",
                   help="with --samples: record the guidance (cfg, cfg-schedule) of the setting with the lowest "
                        "in-domain FID, among those with no more near-copies than held-out images, as the prior's: "
                        "later commands sample with it unless given --cfg/--cfg-schedule. Scores the --sweep of "
                        "cfg and cfg-schedule given, else constant 1.5 and 1, rising to 4 and to 8")
    p.add_argument("--inception", action="store_true",
                   help="with --samples: also the standard Inception FID, KID and precision/recall (needs "
                        "torch-fidelity and its weights)")
    p.add_argument("--retrain-judge", action="store_true", help="train the run's judge again instead of reusing it")
    p.add_argument("--judge-steps", type=int,
                   help="training steps of the judge, when it is trained (default: 600, as stage 1's)")
    p.add_argument("--batch-size", type=int, default=1000, help="samples per batch (default: 1000)")
    _add_precision_option(p, "; the judge and the reconstructions run in full precision")
    _add_sampling_options(p)

    p = command("export", "write the trained model as a folder to share: both stages' configs and weights, the "
                          "codes' metadata, a sample grid, a model card (README.md) and a manifest of checksums")
    p.add_argument("--to", required=True, help="the folder to write (must be empty or absent; see --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an exported model already in --to")
    p.add_argument("--repo-id", default=None,
                   help="the Hugging Face Hub repo id (owner/name) the model card's load commands name")

    p = command("push", "export the trained model and upload it to a Hugging Face Hub model repo (created if needed)")
    p.add_argument("--repo-id", required=True, help="the Hub repo to upload to, owner/name")
    p.add_argument("--private", action="store_true", help="create the repo as private (an existing repo keeps its "
                                                          "visibility)")
    p.set_defaults(overwrite=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f"vqgen.commands.{COMMAND_MODULES[args.command]}")  # torch: only now

    return exit_code(lambda: getattr(module, f"cmd_{args.command}")(args))


if __name__ == "__main__":
    sys.exit(main())
