"""Stage-1 benchmark: train the VQ-VAE on MNIST padded to 32x32 and report speed and quality.

    python scripts/benchmarks/stage1.py --data ../shared/data/mnist --run bench/mnist     # 4,000 x 128 images
    python scripts/benchmarks/stage1.py --run bench/fast --steps 1600 --batch-size 32 --eval-every 200
                                                     # the default recipe at a budget of 51k images

The paper's model (128 channels, 2 residual blocks of 32, K=512, d=64, an 8x8 grid) with the trainer's
default recipe (lr 2e-3 with 100 warm-up steps and a cosine to a tenth, the loss-driven codebook with k-means
initialisation and restarts) at the reference's batch of 128 unless --batch-size says otherwise.

Reports train img/s (median over logging windows), wall and CPU seconds, the images seen (and wall
seconds) at the first evaluation at or under --target-mse, test MSE and PSNR on the original 28x28
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

from stage1_vqvae.config import TRAIN_DEFAULTS
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
    p.add_argument("--lr", type=float, default=TRAIN_DEFAULTS["learning_rate"])
    p.add_argument("--codebook-update", default="loss", choices=("loss", "ema"))
    p.add_argument("--eval-every", type=int, default=1000,
                   help="test evaluations every N steps: the first step at which the target MSE is reached")
    p.add_argument("--target-mse", type=float, default=0.0032,
                   help="the 28x28 test MSE to report the first evaluation at or under (default: the reference's)")
    p.add_argument("--warmup-steps", type=int, default=TRAIN_DEFAULTS["warmup_steps"])
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order")
    p.add_argument("--skip-training", action="store_true", help="only evaluate an existing run")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()

    data_cfg = DataConfig(source=args.data, image_size=32, resize_mode="pad")
    model = dict(hidden_channels=128, res_channels=32, num_res_blocks=2, downsample=4, codebook_size=512,
                 code_dim=64, codebook_update=args.codebook_update)
    train_cfg = TrainConfig(batch_size=args.batch_size, learning_rate=args.lr, max_steps=args.steps,
                            warmup_steps=args.warmup_steps, seed=args.seed, eval_every=args.eval_every,
                            save_every=args.eval_every, log_every=50)
    start, cpu_start, started = time.perf_counter(), time.process_time(), time.time()
    if not args.skip_training:
        train_vqvae(args.run, data_cfg, train_cfg, model, encode=False)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start

    run = Run.load(args.run, need_prior=False)
    data = run.data()
    recon, _, _ = run.reconstruct(data.test.images)
    crop = (slice(None), slice(None), slice(2, 30), slice(2, 30))
    mse = ((recon[crop].float() - data.test.images[crop].float()) / 255).pow(2).mean().item()
    with torch.no_grad():
        codes = torch.cat([run.vqvae.encode(to_model_range(x)) for x in data.test.images.split(500)])
    usage = code_usage(torch.bincount(codes.flatten(), minlength=run.vqvae.config.codebook_size))
    records = JsonlLog(Path(args.run) / "vqvae" / "metrics.jsonl").read()
    train_records = [r for r in records if r["split"] == "train"]
    # The trainer's test MSE is over the padded 32x32 image, whose 2-pixel border of zeros reconstructs
    # exactly (measured: the crop's MSE is 1024/784 times it to 3 digits), so the crop's is that ratio times it.
    reached = next((r for r in records if r["split"] == "test" and r["mse"] * 1024 / 784 <= args.target_mse), None)
    speeds = [r["samples_per_s"] for r in train_records[1:]]  # the first window includes start-up
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "steps": args.steps, "batch_size": args.batch_size, "codebook_update": args.codebook_update,
        "train_img_per_s": statistics.median(speeds) if speeds else None,
        "wall_s": wall, "cpu_s": cpu,
        "target_mse": args.target_mse,
        "reached_at_images": reached and reached["step"] * args.batch_size,
        "reached_at_wall_s": reached and round(reached["time"] - started, 1),  # evaluations included
        "test_mse_28x28": mse, "test_psnr_28x28": psnr(mse),
        "usage": usage["usage"], "codes_used": int(round(usage["usage"] * 512)), "perplexity": usage["perplexity"],
    }
    (Path(args.run) / "benchmark_stage1.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
