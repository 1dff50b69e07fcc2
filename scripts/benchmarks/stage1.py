"""Stage-1 benchmark: train the VQ-VAE on MNIST padded to 32x32 and report speed and quality.

    python scripts/benchmarks/stage1.py --data ../shared/data/mnist --run bench/mnist

Reports train img/s (median over logging windows), test MSE and PSNR on the original 28x28
pixels in [0, 1] (the 2-pixel padding cropped away), codebook usage and perplexity of the
test codes. Results are printed and written to RUN/benchmark_stage1.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from stage1_vqvae.train import train_vqvae
from vqgen.core.data.images import DataConfig, to_model_range
from vqgen.core.evaluate.measures import code_usage, psnr
from vqgen.core.store.jsonl import JsonlLog
from vqgen.core.training.config import TrainConfig
from vqgen.run import Run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/mnist")
    p.add_argument("--run", default="bench/mnist")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--codebook-update", default="loss", choices=("loss", "ema"))
    p.add_argument("--skip-training", action="store_true", help="only evaluate an existing run")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()

    data_cfg = DataConfig(source=args.data, image_size=32, resize_mode="pad")
    model = dict(hidden_channels=128, res_channels=32, num_res_blocks=2, downsample=4, codebook_size=512,
                 code_dim=64, codebook_update=args.codebook_update)
    train_cfg = TrainConfig(batch_size=args.batch_size, learning_rate=args.lr, max_steps=args.steps,
                            warmup_steps=100, eval_every=1000, save_every=1000, log_every=50)
    start = time.perf_counter()
    if not args.skip_training:
        train_vqvae(args.run, data_cfg, train_cfg, model)
    wall = time.perf_counter() - start

    run = Run.load(args.run, need_prior=False)
    data = run.data()
    recon, _, _ = run.reconstruct(data.test.images)
    crop = (slice(None), slice(None), slice(2, 30), slice(2, 30))
    mse = ((recon[crop].float() - data.test.images[crop].float()) / 255).pow(2).mean().item()
    with torch.no_grad():
        codes = torch.cat([run.vqvae.encode(to_model_range(x)) for x in data.test.images.split(500)])
    usage = code_usage(torch.bincount(codes.flatten(), minlength=run.vqvae.config.codebook_size))
    train_records = [r for r in JsonlLog(Path(args.run) / "vqvae" / "metrics.jsonl").read() if r["split"] == "train"]
    speeds = [r["samples_per_s"] for r in train_records[1:]]  # the first window includes start-up
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "steps": args.steps, "batch_size": args.batch_size, "codebook_update": args.codebook_update,
        "train_img_per_s": statistics.median(speeds) if speeds else None,
        "wall_s": wall,
        "test_mse_28x28": mse, "test_psnr_28x28": psnr(mse),
        "usage": usage["usage"], "codes_used": int(round(usage["usage"] * 512)), "perplexity": usage["perplexity"],
    }
    (Path(args.run) / "benchmark_stage1.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
