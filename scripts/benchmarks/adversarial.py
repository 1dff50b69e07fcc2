"""Sharpness benchmark: MSE-only against adversarial (+perceptual) stage 1, scored in one judge's features.

    pip install -e ".[bench]"      # scikit-image, whose wheel carries the photos
    python scripts/benchmarks/adversarial.py photos bench/photos128 --size 128
    python scripts/train_vqvae.py --run bench/p128_mse --data bench/photos128 --max-steps 600 --no-encode
    python scripts/train_vqvae.py --run bench/p128_gan --data bench/photos128 --max-steps 400 --no-encode \\
        --adversarial-weight 0.1 --adversarial-start 200 --lecam-weight 0.001
    python scripts/benchmarks/adversarial.py score bench/p128_mse bench/p128_gan --out bench/sharpness.json

`photos` writes random crops of the colour photos in scikit-image's wheel as a parquet dataset in the
Hugging Face layout (data/train-*.parquet, data/test-*.parquet, no labels): training crops from the
photos scripts/benchmarks/photos.py trains on, test crops from the two it holds out whole, so stage 1
and its judge never see a test photo.

`score` reloads each run's kept weights and scores its test reconstructions: PSNR, code usage, and
the in-domain FID of the reconstructions against the test images in the features of one judge, the
first run's (RUN/judge; trained there if missing, as stage 1's sharpness evaluation trains it), so
every run is measured in the same features. It also reports each run's training wall-clock (from
its metrics.jsonl: the span of its records, scaled to all its steps), for equal-time comparisons.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import torch

from stage1_vqvae.config import GANConfig, VQVAEConfig
from stage1_vqvae.model import VQVAE, reconstruction_errors
from stage1_vqvae.train import sharpness_features
from vqgen.arguments import exit_code
from vqgen.core.data.config import DataConfig
from vqgen.core.data.images import load_image_data, to_model_range
from vqgen.core.evaluate import quality
from vqgen.core.evaluate.measures import code_usage, psnr
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store.configs import load_config
from vqgen.core.store.jsonl import JsonlLog
from vqgen.core.store.layout import RunLayout
from vqgen.core.store.weights import load_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    photos = sub.add_parser("photos", help="write random photo crops as a parquet dataset")
    photos.add_argument("out", help="the dataset folder to write (refused if it holds a data/ folder)")
    photos.add_argument("--size", type=int, default=128, help="crop side in pixels (default: 128)")
    photos.add_argument("--train-crops", type=int, default=2000, help="training crops (default: 2000)")
    photos.add_argument("--test-crops", type=int, default=200, help="test crops per held-out photo (default: 200)")
    photos.add_argument("--seed", type=int, default=0, help="seed of the crops (default: 0)")
    score = sub.add_parser("score", help="score runs' test reconstructions in one judge's features")
    score.add_argument("runs", nargs="+", help="run directories with a trained stage 1")
    score.add_argument("--batch-size", type=int, default=50, help="test images per batch (default: 50)")
    score.add_argument("--out", default=None, help="also write the rows as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_code(lambda: write_photos(args) if args.command == "photos" else score(args))


def write_photos(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import pyarrow as pa
    import pyarrow.parquet as pq
    from photos import TEST_PHOTOS, TRAIN_PHOTOS, load_photos, random_crops  # a sibling script
    from PIL import Image

    data = Path(args.out) / "data"
    if data.exists():
        raise VQGenError(f"{data} already exists: choose another folder (nothing was written)")
    if args.size < 8 or args.train_crops < 1 or args.test_crops < 2:
        raise VQGenError(f"--size must be >= 8, --train-crops >= 1 and --test-crops >= 2, got {args.size}, "
                         f"{args.train_crops} and {args.test_crops}")
    gen = torch.Generator().manual_seed(args.seed)
    splits = {"train": random_crops(load_photos(TRAIN_PHOTOS), args.train_crops, args.size, gen),
              "test": torch.cat([random_crops([p], args.test_crops, args.size, gen) for p in load_photos(TEST_PHOTOS)])}
    data.mkdir(parents=True)
    for split, crops in splits.items():
        cells = []
        for i, crop in enumerate(crops):
            buffer = io.BytesIO()
            Image.fromarray(crop.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
            cells.append({"bytes": buffer.getvalue(), "path": f"{split}-{i:05d}.png"})
        pq.write_table(pa.table({"image": cells}), data / f"{split}-00000-of-00001.parquet")
        print(f"{split}: {len(crops)} crops of {args.size} px -> {data}/{split}-00000-of-00001.parquet")


def train_seconds(records: list[dict]) -> float:
    """A run's training wall-clock from its metrics.jsonl: the span of its records (whose first is written a
    logging window after the start), scaled to all its steps."""
    if len(records) < 2:
        return float("nan")
    first, last = records[0], records[-1]
    span = last["time"] - first["time"]
    return span * last["step"] / max(last["step"] - first["step"], 1)


@torch.no_grad()
def score_run(run: Path, judge: quality.Judge, batch_size: int) -> dict:
    layout = RunLayout(run)
    model = load_model(VQVAE, VQVAEConfig, layout.vqvae.path).eval()
    data = load_image_data(load_config(DataConfig, layout.vqvae.data_config))
    errors, real, made = [], [], []
    counts = torch.zeros(model.config.codebook_size, dtype=torch.long)
    for start in range(0, len(data.test), batch_size):
        images = to_model_range(data.test.take(range(start, min(start + batch_size, len(data.test)))))
        mse, recon, indices = reconstruction_errors(model, images)
        errors.append(mse)
        counts += torch.bincount(indices.flatten(), minlength=model.config.codebook_size)
        r, m = sharpness_features(judge, images, recon)
        real.append(r)
        made.append(m)
    mse = torch.cat(errors).mean().item()
    records = JsonlLog(layout.vqvae.metrics).read()
    tests = [r for r in records if r["split"] == "test"]
    gan = load_config(GANConfig, layout.vqvae.gan_config) if layout.vqvae.gan_config.is_file() else GANConfig()
    return {"run": str(run), "steps": tests[-1]["step"] if tests else None,
            "best_step": tests[-1].get("best_step") if tests else None,
            "train_seconds": train_seconds(records), "psnr": psnr(mse), "mse": mse,
            "recon_fid": quality.frechet_distance_of(torch.cat(real), torch.cat(made)),
            **{k: v for k, v in code_usage(counts).items() if k in ("usage", "dead_codes")},
            "adversarial_weight": gan.adversarial_weight,
            "perceptual": f"{gan.perceptual} x {gan.perceptual_weight}" if gan.perceptual_weight else "-"}


def score(args: argparse.Namespace) -> None:
    runs = [Path(r) for r in args.runs]
    for run in runs:
        if not RunLayout(run).vqvae.weights.is_file():
            raise VQGenError(f"{run} has no trained stage 1 ({RunLayout(run).vqvae.weights} is missing)")
    first = RunLayout(runs[0])
    data = load_image_data(load_config(DataConfig, first.vqvae.data_config))
    judge = quality.run_judge(first.judge, data)
    rows = [score_run(run, judge, args.batch_size) for run in runs]
    print("| run | adversarial | perceptual | steps (kept) | train s | test PSNR | recon FID | usage |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {Path(r['run']).name} | {r['adversarial_weight']:g} | {r['perceptual']} | {r['steps']} "
              f"({r['best_step']}) | {r['train_seconds']:.0f} | {r['psnr']:.2f} | {r['recon_fid']:.4g} | "
              f"{r['usage']:.3f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"judge": str(first.judge.path), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
