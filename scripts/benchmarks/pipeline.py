"""Data-pipeline benchmark: how many decoded-and-resized JPEG images a loader worker delivers per second,
and so how many workers a GPU needs to be kept busy.

    pip install -e ".[bench]"                      # scikit-image, whose wheel carries the photos
    python scripts/benchmarks/pipeline.py           # 256 px from 500x375 JPEGs, workers 0, 1 and 2
    python scripts/benchmarks/pipeline.py --source-size 1024x768 --card-img-s 300,1200

Data: --images JPEG files (quality --quality) cut at --source-size from the colour photographs in
scikit-image's `skimage/data` (each photo scaled up once where it is smaller than the cut, so every file
has the same size; 500x375 is a typical photo of a web-scraped dataset). They are loaded as a user's
folder is: converted once into the Arrow cache (here under OUT/cache), then streamed, each batch decoded
and brought to --size x --size by `--resize-mode` image by image, as stage 1's loader does.

Reported:
- one worker's rate: images/s of `ImageDataset.batch` in this process with one torch thread (what a
  loader worker does, without the hand-over to the main process);
- the loader's rate with 0, 1, 2, ... worker processes (`make_loader`, the trainer's loader; the first
  batch, which starts the workers, is not timed);
- for each rate in --card-img-s (a GPU's measured training images/s), the workers it needs at one
  worker's rate, rounded up.
Results are printed and written to OUT/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vqgen.core.data.config import DataConfig
from vqgen.core.data.images import ImageDataset, load_image_data
from vqgen.core.data.loaders import make_loader, stop_workers

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "hubble_deep_field.jpg", "ihc.png",
          "motorcycle_left.png", "retina.jpg", "rocket.jpg")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/pipeline", help="folder for the JPEGs, the cache and the results")
    p.add_argument("--images", type=int, default=512, help="JPEG files to make (default: 512)")
    p.add_argument("--source-size", default="500x375", help="width x height of the files (default: 500x375)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the files (default: 90)")
    p.add_argument("--size", type=int, default=256, help="side the loader brings every image to (default: 256)")
    p.add_argument("--resize-mode", default="center-crop", help="how it gets there (default: center-crop)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    p.add_argument("--workers", default="0,1,2", help="loader worker counts to time, a comma list (default: 0,1,2)")
    p.add_argument("--card-img-s", default="",
                   help="training rates of a GPU in images/s, a comma list: the workers each needs")
    return p.parse_args(argv)


def make_jpegs(folder: Path, count: int, width: int, height: int, quality: int) -> None:
    """`count` JPEGs of width x height, random crops (seed 0) of the bundled photos."""
    from skimage import data as skdata  # the benchmark extra

    photos = []
    for name in PHOTOS:
        img = Image.open(Path(skdata.__file__).parent / name).convert("RGB")
        scale = max(width / img.width, height / img.height, 1.0)
        photos.append(img.resize((math.ceil(img.width * scale), math.ceil(img.height * scale)),
                                 Image.Resampling.BICUBIC) if scale > 1 else img)
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img = photos[i % len(photos)]
        x, y = rng.integers(0, img.width - width + 1), rng.integers(0, img.height - height + 1)
        img.crop((x, y, x + width, y + height)).save(folder / f"{i:05d}.jpg", quality=quality)


def rate_in_process(dataset: ImageDataset, batch_size: int) -> float:
    """Images/s of building every batch in this process (one torch thread)."""
    order = np.arange(len(dataset))
    dataset.batch(order[:batch_size].tolist())  # warm the page cache and the decoder
    start = time.perf_counter()
    for at in range(0, len(order), batch_size):
        dataset.batch(order[at:at + batch_size].tolist())
    return len(order) / (time.perf_counter() - start)


def rate_through_loader(dataset: ImageDataset, batch_size: int, workers: int) -> float:
    """Images/s the trainer's loader delivers with `workers` processes, after its first batch."""
    loader = make_loader(dataset, batch_size, train=True, num_workers=workers)
    batches = iter(loader)
    next(batches)  # starts the workers
    start, seen = time.perf_counter(), 0
    for batch in batches:
        seen += len(batch["image"])
    elapsed = time.perf_counter() - start
    stop_workers(loader)
    return seen / elapsed


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    width, height = (int(v) for v in args.source_size.lower().split("x"))
    folder = out / f"jpegs_{width}x{height}_q{args.quality}_{args.images}"
    if not folder.is_dir():
        make_jpegs(folder, args.images, width, height, args.quality)
    os.environ["VQGEN_CACHE"] = str(out / "cache")
    data = load_image_data(DataConfig(source=str(folder), image_size=args.size, resize_mode=args.resize_mode,
                                      stream="always", test_fraction=0.01))
    dataset = ImageDataset(data.train)
    one = rate_in_process(dataset, args.batch_size)
    loader = {w: rate_through_loader(dataset, args.batch_size, w)
              for w in (int(v) for v in args.workers.split(","))}
    cards = [float(v) for v in args.card_img_s.split(",") if v]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "files": f"{args.images} JPEGs of {width}x{height}, quality {args.quality}, "
                 f"{sum(f.stat().st_size for f in folder.iterdir()) / args.images / 1024:.0f} KiB each; "
                 f"the {len(dataset)} of the training split timed",
        "to": f"{args.size}x{args.size} by {args.resize_mode}",
        "one_worker_img_s": one,
        "loader_img_s_by_workers": loader,
        "workers_needed": {rate: math.ceil(rate / one) for rate in cards},
    }
    (out / "pipeline.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
