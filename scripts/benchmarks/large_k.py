"""Large-K benchmark: K=512 (the paper's quantizer) against K=16,384 (factorised codes, and plain).

    python scripts/benchmarks/large_k.py --data ../shared/data/mnist --image-size 64 --run bench/large_k

Each variant trains the same VQ-VAE for the same steps on MNIST at 64 px (16x16 code grids), in its
own process so that peak memory is its own, then is evaluated on the whole test split (10k images x
256 = 2.56M test vectors, more than 10 per code at K=16,384). Reported per variant: test usage,
perplexity and dead codes over the test codes, test MSE on [0, 1] pixels, train img/s (median over
logging windows), wall time, and peak memory (CPU: the process's peak RSS; GPU: the peak of
torch.cuda.max_memory_allocated). Written to RUN/benchmark_large_k.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {  # name: model options that differ between the variants
    "k512": dict(codebook_size=512),
    "k16384-factorised": dict(codebook_size=16384, code_lookup_dim=8),
    "k16384-plain": dict(codebook_size=16384),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/mnist")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--run", default="bench/large_k")
    p.add_argument("--variants", default="k512,k16384-factorised",
                   help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden-channels", type=int, default=64)
    p.add_argument("--res-channels", type=int, default=32)
    p.add_argument("--code-dim", type=int, default=64)
    p.add_argument("--lookup-dim", type=int, default=8, help="code_lookup_dim of the factorised variant")
    p.add_argument("--codebook-update", default="loss", choices=("loss", "ema"))
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    p.add_argument("--max-images", type=int, default=None, help="use at most this many images per split (smoke runs)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # run one variant in this process
    args = p.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; expected a comma list of {', '.join(VARIANTS)}")
    return args


def peak_memory_mib() -> dict[str, float]:
    import torch

    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if torch.cuda.is_available():
        out["peak_cuda_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_one(args: argparse.Namespace, variant: str) -> dict:
    """Train and evaluate one variant in this process; its result as a dict."""
    import torch

    from stage1_vqvae.train import train_vqvae
    from vqgen.core.data.config import DataConfig
    from vqgen.core.store.jsonl import JsonlLog
    from vqgen.core.training.config import TrainConfig

    run = Path(args.run) / variant
    data_cfg = DataConfig(source=args.data, image_size=args.image_size, max_images=args.max_images)
    model = dict(hidden_channels=args.hidden_channels, res_channels=args.res_channels, num_res_blocks=2,
                 downsample=4, code_dim=args.code_dim, codebook_update=args.codebook_update, **VARIANTS[variant])
    if "code_lookup_dim" in model:
        model["code_lookup_dim"] = args.lookup_dim
    train_cfg = TrainConfig(batch_size=args.batch_size, learning_rate=args.lr, max_steps=args.steps,
                            warmup_steps=min(100, args.steps // 10), eval_every=0, save_every=0,
                            log_every=max(1, min(50, args.steps // 6)), mixed_precision=args.mixed_precision)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train_vqvae(run, data_cfg, train_cfg, model, encode=False, overwrite=True)
    wall = time.perf_counter() - start
    records = JsonlLog(run / "vqvae" / "metrics.jsonl").read()
    test = [r for r in records if r["split"] == "test"][-1]
    speeds = [r["samples_per_s"] for r in records if r["split"] == "train"][1:]  # the first window: start-up
    k = model["codebook_size"]
    return {
        "variant": variant, "codebook_size": k, "code_lookup_dim": model.get("code_lookup_dim", 0),
        "steps": args.steps, "batch_size": args.batch_size, "mixed_precision": args.mixed_precision,
        "test_usage": test["usage"], "test_codes_used": int(round(test["usage"] * k)),
        "test_perplexity": test["perplexity"], "test_dead_codes": int(test["dead_codes"]),
        "test_mse": test["mse"], "test_psnr": test["psnr"],
        "train_img_per_s": statistics.median(speeds) if speeds else None, "wall_s": wall,
        **peak_memory_mib(),
    }


def main() -> None:
    args = parse_args()
    if args.one:
        result = run_one(args, args.one)
        (Path(args.run) / args.one / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        return
    import torch

    results = []
    for variant in args.variants.split(","):
        child = [sys.executable, __file__, *sys.argv[1:], "--one", variant]
        subprocess.run(child, check=True)
        results.append(json.loads((Path(args.run) / variant / "result.json").read_text()))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    summary = {"machine": f"{device}, torch {torch.__version__}", "data": args.data, "image_size": args.image_size,
               "results": results}
    Path(args.run, "benchmark_large_k.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print("\n| variant | test usage | perplexity | dead codes | test MSE | img/s | peak memory |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        peak = r.get("peak_cuda_allocated_mib", r["peak_rss_mib"])
        print(f"| {r['variant']} | {r['test_usage']:.1%} ({r['test_codes_used']}) | {r['test_perplexity']:.0f} | "
              f"{r['test_dead_codes']} | {r['test_mse']:.5f} | {r['train_img_per_s'] or 0:.0f} | {peak:.0f} MiB |")


if __name__ == "__main__":
    main()
