"""Real-photo benchmark: the paper's convnet against the scalable resnet trunk, for the same compute.

    pip install -e ".[bench]"                      # scikit-image, whose wheel carries the photos
    python scripts/benchmarks/photos.py             # 64 and 128 px, 240 CPU-seconds of training each
    python scripts/benchmarks/photos.py --sizes 128 --budget 600
    python scripts/benchmarks/photos.py --sizes 128 --resnet-width 16 --resnet-mult 1,2,2,4 --resnet-blocks 0
    python scripts/benchmarks/photos.py --sizes 128 --resnet-patch 4 --resnet-width 64 --resnet-mult 1,2 \
        --resnet-blocks 0                          # the trunk with a patch fold
    python scripts/benchmarks/photos.py --mixed-precision bf16 --budget 120   # on a GPU, when there is one
    python scripts/benchmarks/photos.py --test-photos astronaut.png,coffee.png \
        --train-photos hubble_deep_field.jpg,ihc.png,motorcycle_left.png,motorcycle_right.png,retina.jpg  # validation

Data: the colour photographs bundled in scikit-image's `skimage/data`, each resized once to a 300-px
short side (the smallest photo's, so none is upscaled). Training images are random crops (seeded) of
the TRAIN_PHOTOS; the test images are fixed crops of the TEST_PHOTOS, whole photos never trained on
(`--train-photos` / `--test-photos` choose others: a validation split to choose a trunk on, say).

Both trunks code an image as the same 16x16 grid of K=512 codes (downsample = size / 16): the paper
net at the width the sized defaults give colour images, the resnet trunk at the size's preset
(`stage1_vqvae.train.PRESETS`). Each trains, one after the other, until its budget is spent: CPU
seconds of this process on a CPU (time.process_time: another job on a shared machine does not eat
the budget), wall seconds on a GPU (synchronised). The learning rate warms up from a tenth of its
peak over the first 5% of the budget and follows a cosine over all of it, both by the clock, not by
steps, so a slower model is not left warming up. Reported: test PSNR on [0, 1] pixels, steps,
parameters, img/s. One process on one device (the budget is per process): run it with python,
not a multi-process launch.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL import Image

from stage1_vqvae.config import PRESETS, VQVAEConfig, trunk_levels
from stage1_vqvae.model import VQVAE, reconstruction_errors
from vqgen.arguments import exit_code
from vqgen.core.evaluate.measures import psnr
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.training.config import TrainConfig
from vqgen.core.training.loop import make_optimizer

# The RGB photographs in skimage/data (not the synthetic ones: color, chessboard_RGB, phantom). The two
# motorcycle views are a stereo pair, so both stay on the training side.
TRAIN_PHOTOS = ("astronaut.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
                "motorcycle_right.png", "retina.jpg")
TEST_PHOTOS = ("chelsea.png", "rocket.jpg")
SHORT_SIDE = 300
PAPER = dict(architecture="paper", hidden_channels=128, res_channels=64, num_res_blocks=2)  # sized default
WARMUP = 0.05  # of the budget: a slower model must not spend its whole budget warming up


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="64,128", help="crop sides to benchmark, a comma list (default: 64,128)")
    p.add_argument("--budget", type=float, default=240.0,
                   help="training budget of each model: CPU seconds on a CPU, wall seconds on a GPU (default: 240)")
    p.add_argument("--batch-size", type=int, default=16, help="training crops per step (default: 16)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    p.add_argument("--grid", type=int, default=16, help="side of the code grid, for both trunks (default: 16)")
    p.add_argument("--test-crops", type=int, default=48, help="test crops per held-out photo (default: 48)")
    p.add_argument("--trunks", default="paper,resnet", help="which trunks, a comma list (default: paper,resnet)")
    p.add_argument("--resnet-width", type=int, default=None,
                   help="the resnet trunk's first-level width (default: the size's preset)")
    p.add_argument("--resnet-mult", default=None,
                   help="the resnet trunk's channel multipliers, a comma list (default: the size's preset)")
    p.add_argument("--resnet-blocks", type=int, default=None,
                   help="the resnet trunk's residual blocks per level (default: the size's preset)")
    p.add_argument("--resnet-patch", type=int, default=None,
                   help="the resnet trunk's patch fold (patch_size; default: the size's preset)")
    p.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"),
                   help="autocast precision (no | fp16 | bf16; default: no)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels-last memory format, as the trainer uses (default: on)")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops and the models (default: 0)")
    p.add_argument("--train-photos", default=",".join(TRAIN_PHOTOS),
                   help="the photos to crop training images from, a comma list (default: the seven above)")
    p.add_argument("--test-photos", default=",".join(TEST_PHOTOS),
                   help="the photos held out whole for the test, a comma list; none may be a training photo "
                        "(default: chelsea.png,rocket.jpg). To choose a trunk without the test photos, hold out "
                        "training photos instead: a validation split")
    p.add_argument("--photo-dir", default=None,
                   help="a folder holding the photos under the same names (default: scikit-image's skimage/data)")
    p.add_argument("--out", default="bench/photos.json", help="where to write the results (default: bench/photos.json)")
    return p.parse_args(argv)


def photo_dir(folder: str | None = None) -> Path:
    """`--photo-dir`, or scikit-image's bundled data folder."""
    if folder:
        return Path(folder)
    try:
        import skimage
    except ImportError:
        raise VQGenError("the photo benchmark reads scikit-image's bundled photos: pip install -e '.[bench]'") from None
    return Path(skimage.__file__).parent / "data"


def photo_split(train: str, test: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`--train-photos` and `--test-photos` as name tuples: each non-empty, no photo on both sides."""
    train_names = tuple(name for name in train.split(",") if name)
    test_names = tuple(name for name in test.split(",") if name)
    if not train_names or not test_names:
        raise VQGenError(f"--train-photos and --test-photos must each name a photo, got {train!r} and {test!r}")
    if both := sorted(set(train_names) & set(test_names)):
        raise VQGenError(f"{', '.join(both)} is in both --train-photos and --test-photos: a test photo is held out whole")
    return train_names, test_names


def load_photos(names: tuple[str, ...], folder: str | None = None) -> list[torch.Tensor]:
    """Each photo as (3, H, W) uint8, resized to a SHORT_SIDE-px short side."""
    photos = []
    for name in names:
        path = photo_dir(folder) / name
        if not path.is_file():
            raise VQGenError(f"no photo {name!r} in {path.parent} (the photos there: "
                             f"{', '.join(sorted(f.name for f in path.parent.glob('*.*'))) or 'none'})")
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = SHORT_SIDE / min(im.size)
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
            photos.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).contiguous())
    return photos


def random_crops(photos: list[torch.Tensor], n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 3, size, size) uint8 crops: a photo chosen in proportion to its area, then a uniform position."""
    areas = torch.tensor([float(p.shape[1] * p.shape[2]) for p in photos])
    which = torch.multinomial(areas, n, replacement=True, generator=gen)
    crops = []
    for i in which.tolist():
        photo = photos[i]
        top = int(torch.randint(photo.shape[1] - size + 1, (1,), generator=gen))
        left = int(torch.randint(photo.shape[2] - size + 1, (1,), generator=gen))
        crops.append(photo[:, top:top + size, left:left + size])
    return torch.stack(crops)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def resnet_overrides(args: argparse.Namespace) -> dict:
    """The trunk options given on the command line, over the size's preset."""
    options = {}
    if args.resnet_width is not None:
        options["hidden_channels"] = args.resnet_width
    if args.resnet_blocks is not None:
        options["num_res_blocks"] = args.resnet_blocks
    if args.resnet_patch is not None:
        options["patch_size"] = args.resnet_patch
    if args.resnet_mult is not None:
        try:
            options["channel_mult"] = tuple(int(m) for m in args.resnet_mult.split(","))
        except ValueError:
            raise VQGenError(f"--resnet-mult must be a comma list of integers like 1,2,2,4, got {args.resnet_mult!r}") from None
    return options


def model_config(trunk: str, size: int, grid: int, trunk_options: dict | None = None) -> VQVAEConfig:
    if size % grid:
        raise VQGenError(f"crop size {size} is not divisible by the code grid side {grid}")
    resnet = [side for side, preset in PRESETS.items() if preset["architecture"] == "resnet"]
    if trunk == "resnet" and str(size) not in resnet:
        raise VQGenError(f"no resnet preset for {size} px; resnet presets: {', '.join(resnet)}")
    options = PAPER if trunk == "paper" else {**PRESETS[str(size)], **(trunk_options or {})}
    options = {**options, "downsample": size // grid}
    from_preset = "channel_mult" not in (trunk_options or {})
    levels = trunk_levels(options["downsample"], options.get("patch_size", 1))
    if from_preset and options.get("channel_mult") and len(options["channel_mult"]) != levels:
        options["channel_mult"] = ()  # the preset's levels are for another grid or fold: the default multipliers
    return VQVAEConfig(image_height=size, image_width=size, codebook_size=512, code_dim=64, **options)


def train_for_budget(accelerator: Accelerator, cfg: VQVAEConfig, photos: list[torch.Tensor],
                     args: argparse.Namespace) -> tuple[VQVAE, dict[str, float]]:
    set_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = VQVAE(cfg).to(memory_format=fmt)
    params = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, TrainConfig(learning_rate=args.lr))
    model, optimizer = accelerator.prepare(model, optimizer)
    on_gpu = accelerator.device.type == "cuda"
    clock = time.perf_counter if on_gpu else time.process_time  # see the module's docstring
    model.train()
    steps, start, wall = 0, clock(), time.perf_counter()
    while (used := clock() - start) < args.budget:
        warm = min(1.0, 0.1 + used / (WARMUP * args.budget))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warm * 0.5 * (1 + math.cos(math.pi * used / args.budget))
        images = to_model_range(random_crops(photos, args.batch_size, cfg.image_height, gen)).to(accelerator.device)
        images = images.contiguous(memory_format=fmt)
        with accelerator.autocast():
            loss = model(images).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        if on_gpu and steps % 20 == 0:
            torch.cuda.synchronize()  # the clock measures finished work, not queued kernels
    if on_gpu:
        torch.cuda.synchronize()
    used, wall = clock() - start, time.perf_counter() - wall
    return accelerator.unwrap_model(model), {
        "params": params, "steps": steps, "images": steps * args.batch_size, "budget_used_s": used, "wall_s": wall,
        "img_per_budget_s": steps * args.batch_size / used, "img_per_wall_s": steps * args.batch_size / wall,
    }


@torch.no_grad()
def test_psnr(accelerator: Accelerator, model: VQVAE, test: torch.Tensor) -> float:
    """PSNR of the mean per-image MSE on [0, 1] pixels over the fixed test crops."""
    model.eval()
    errors = []
    for batch in test.split(32):
        with accelerator.autocast():
            mse, _, _ = reconstruction_errors(model, to_model_range(batch).to(accelerator.device))
        errors.append(mse.float().cpu())
    return psnr(torch.cat(errors).mean().item())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_code(lambda: benchmark(args))


def benchmark(args: argparse.Namespace) -> None:
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        raise VQGenError(f"--sizes must be a comma list of integers like 64,128, got {args.sizes!r}") from None
    trunks = args.trunks.split(",")
    if set(trunks) - {"paper", "resnet"}:
        raise VQGenError(f"--trunks must name paper and/or resnet, got {args.trunks!r}")
    resnet = resnet_overrides(args)
    train_names, test_names = photo_split(args.train_photos, args.test_photos)
    for size in sizes:  # a wrong trunk option fails here, before any training
        model_config("resnet", size, args.grid, resnet)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    train_photos, test_photos = load_photos(train_names, args.photo_dir), load_photos(test_names, args.photo_dir)
    device = (torch.cuda.get_device_name() if accelerator.device.type == "cuda"
              else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    results = []
    for size in sizes:
        gen = torch.Generator().manual_seed(args.seed + 1)
        test = torch.cat([random_crops([p], args.test_crops, size, gen) for p in test_photos])
        for trunk in trunks:
            cfg = model_config(trunk, size, args.grid, resnet)
            model, stats = train_for_budget(accelerator, cfg, train_photos, args)
            row = {"size": size, "trunk": trunk, "test_psnr": test_psnr(accelerator, model, test), **stats,
                   "config": asdict(cfg)}
            results.append(row)
            print(f"{size} px {trunk:6s}: test PSNR {row['test_psnr']:.2f} dB after {stats['steps']} steps "
                  f"({stats['img_per_budget_s']:.1f} img/budget-s, {stats['params'] / 1e6:.2f}M params)", flush=True)
    clock = "wall seconds (GPU)" if accelerator.device.type == "cuda" else "CPU seconds of this process"
    summary = {"device": device, "torch": torch.__version__, "budget": args.budget, "budget_clock": clock,
               "batch_size": args.batch_size, "mixed_precision": args.mixed_precision, "grid": args.grid,
               "channels_last": args.channels_last,
               "train_photos": train_names, "test_photos": test_names, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{device}; budget {args.budget:g} {clock} per model, batch {args.batch_size}, "
          f"{args.mixed_precision} precision\n")
    print("| size | trunk | params | steps | img/s (budget clock) | test PSNR (dB) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['size']} | {r['trunk']} | {r['params'] / 1e6:.2f}M | {r['steps']} | "
              f"{r['img_per_budget_s']:.1f} | {r['test_psnr']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
