"""Defaults on a dataset, end to end: train both stages as a user would, then score the samples.

    python scripts/benchmarks/data.py --name openmoji32 --train-args "--data ../shared/data/openmoji --image-size 32"
    python scripts/benchmarks/data.py --name shapes --existing runs/default --judge bench/data/judges/shapes

Trains stage 1 and a prior with `scripts/train_vqvae.py` / `scripts/train_prior.py` (defaults plus
--train-args / --prior-args), and with --unconditional a second prior that ignores the labels. Then,
for each sampling setting of --sweep (cfg:temperature pairs), draws --samples samples and scores them
with the dataset's judge (trained once, kept in --judge and reused, so "before" and "after" runs are
judged alike): in-domain FID, class accuracy and coverage, beside real training images. Also reports
best-vs-last test metrics of both stages (from metrics.jsonl), wall-clock per stage, and writes a
sample grid. Results: OUT/NAME/benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from stage2_prior.config import SamplingConfig
from vqgen.core.store.imageio import save_grid
from vqgen.core.store.jsonl import JsonlLog
from vqgen.core.store.layout import RunLayout
from vqgen.run import Run

ROOT = Path(__file__).resolve().parents[2]


def train(script: str, args: list[str], log: Path) -> float:
    """Run a training script as a user would; wall-clock seconds."""
    start = time.perf_counter()
    with log.open("a") as f:
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], stdout=f, stderr=f)
    if done.returncode:
        sys.exit(f"error: {script} {' '.join(args)} failed ({done.returncode}); see {log}")
    return time.perf_counter() - start


def best_vs_last(metrics_file: Path, metric: str) -> dict[str, float]:
    """The best and the last test value of a stage, and which one its weights hold."""
    tests = [r for r in JsonlLog(metrics_file).read() if r.get("split") == "test"] if metrics_file.is_file() else []
    if not tests:
        sys.exit(f"error: {metrics_file} holds no test evaluation; score a run whose stages were evaluated")
    best = min(tests, key=lambda r: r[metric])
    kept_step = tests[-1].get("best_step", tests[-1]["step"])  # runs before held-out training kept the last
    kept = next(r for r in tests if r["step"] == kept_step)
    return {"metric": metric, "best": best[metric], "best_step": best["step"], "last": tests[-1][metric],
            "last_step": tests[-1]["step"], "kept": kept[metric], "kept_step": kept_step,
            "kept_vs_best_pct": 100 * (kept[metric] / best[metric] - 1)}


def score(run_dir: Path, judge: Path, settings: list[tuple[float, float]], n: int, seed: int,
          judge_steps: int | None) -> list[dict]:
    """Sample quality at each (cfg, temperature), the scale constant over the draw, with the dataset's judge."""
    layout = RunLayout(run_dir)
    if (judge / "model.safetensors").is_file() and not layout.judge.trained:
        shutil.copytree(judge, layout.judge.path)
    accelerator = Accelerator()
    run = Run.load(run_dir, device=accelerator.device)
    data = run.data()
    results = []
    for cfg, temperature in settings:
        if cfg != 1.0 and not run.prior.config.num_classes:
            continue  # guidance needs labels
        start = time.perf_counter()
        sampling = SamplingConfig(cfg_scale=cfg, cfg_schedule="constant", temperature=temperature)
        scores = run.sample_quality(accelerator, n, data, sampling, seed=seed, judge_steps=judge_steps)
        results.append({"cfg": cfg, "temperature": temperature, "seconds": time.perf_counter() - start, **scores})
        print(json.dumps(results[-1]), flush=True)
    if not (judge / "model.safetensors").is_file():
        shutil.copytree(layout.judge.path, judge, dirs_exist_ok=True)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="dataset name, for the output folder and the judge")
    p.add_argument("--out", default="bench/data", help="output root (default: bench/data)")
    p.add_argument("--train-args", default="", help="options for scripts/train_vqvae.py, as one string")
    p.add_argument("--prior-args", default="", help="options for scripts/train_prior.py, as one string")
    p.add_argument("--existing", default=None, help="score this trained run instead of training one")
    p.add_argument("--unconditional", action="store_true", help="also train and score an unconditional prior")
    p.add_argument("--judge", default=None, help="the dataset's judge folder (default: OUT/judges/NAME)")
    p.add_argument("--judge-steps", type=int, help="judge training steps (default: vqgen eval's, 600)")
    p.add_argument("--samples", type=int, default=1000, help="samples per setting (default: 1000)")
    p.add_argument("--sweep", default="1:1,1.5:1,2:1,3:1,2:0.9",
                   help="cfg:temperature settings to score (default: 1:1,1.5:1,2:1,3:1,2:0.9)")
    p.add_argument("--grid-cfg", type=float, default=None,
                   help="cfg of the sample grid (default: the prior's, as vqgen sample draws)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()

    out = Path(args.out) / args.name
    out.mkdir(parents=True, exist_ok=True)
    judge = Path(args.judge) if args.judge else Path(args.out) / "judges" / args.name
    settings = [tuple(float(v) for v in pair.split(":")) for pair in args.sweep.split(",")]
    log = out / "train.log"
    result: dict = {"name": args.name, "machine": f"{platform.processor() or platform.machine()}, "
                    f"{torch.get_num_threads()} threads, " + (torch.cuda.get_device_name() if torch.cuda.is_available()
                                                               else "no GPU"),
                    "torch": torch.__version__, "train_args": args.train_args, "prior_args": args.prior_args}
    runs = {"conditional": Path(args.existing) if args.existing else out / "run"}
    if not args.existing:
        run = runs["conditional"]
        result["stage1_s"] = train("train_vqvae.py", ["--run", str(run), *shlex.split(args.train_args)], log)
        result["stage2_s"] = train("train_prior.py", ["--run", str(run), *shlex.split(args.prior_args)], log)
        if args.unconditional:
            runs["unconditional"] = out / "run-unconditional"
            shutil.rmtree(runs["unconditional"], ignore_errors=True)
            for part in ("vqvae", "codes"):
                shutil.copytree(run / part, runs["unconditional"] / part)
            result["stage2_unconditional_s"] = train(
                "train_prior.py", ["--run", str(runs["unconditional"]), "--unconditional",
                                   *shlex.split(args.prior_args)], log)
    layout = RunLayout(runs["conditional"])
    result["stage1"] = best_vs_last(layout.vqvae.metrics, "mse")
    result["stage2"] = best_vs_last(layout.prior.metrics, "bits_per_code")
    for kind, run_dir in runs.items():
        result[f"scores_{kind}"] = score(run_dir, judge, settings, args.samples, args.seed, args.judge_steps)
    if "unconditional" in runs:
        result["stage2_unconditional"] = best_vs_last(RunLayout(runs["unconditional"]).prior.metrics,
                                                      "bits_per_code")
    run = Run.load(runs["conditional"])
    _, images = run.sample(Accelerator(), 64, run.label_plan(None, 64), SamplingConfig(cfg_scale=args.grid_cfg),
                           seed=args.seed)
    save_grid(images, out / "samples.png", nrow=8)
    (out / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("scores")}, indent=2))


if __name__ == "__main__":
    main()
