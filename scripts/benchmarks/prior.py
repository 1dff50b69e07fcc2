"""Stage-2 and sampling benchmark on the code grids of the stage-1 benchmark run.

    python scripts/benchmarks/prior.py --run bench/mnist --seconds 300

Trains each prior for about the same wall-clock time (steps = measured steps/s x seconds),
then reports held-out bits per code and per image, training codes/s, and sampling speed at
n=64 and n=1000: codes only, and codes + decode through `vqgen.run.sample`.
Results go to RUN-PRIOR/benchmark_prior.json and are printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from stage2_prior.config import TRAIN_DEFAULTS, SamplingConfig
from stage2_prior.registry import PRIORS
from stage2_prior.sampling import sample_codes
from stage2_prior.train import train_prior
from vqgen.core.store.codes import load_codes
from vqgen.core.store.jsonl import JsonlLog
from vqgen.core.training.config import TrainConfig
from vqgen.run import Run


def steps_per_second(kind: str, codes: torch.Tensor, labels: torch.Tensor | None, batch_size: int,
                     config_fields: dict) -> float:
    """Measure a few optimizer steps of a fresh prior (after warm-up)."""
    config_cls, model_cls = PRIORS[kind]
    model = model_cls(config_cls(**config_fields))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch, lab = codes[:batch_size].long(), None if labels is None else labels[:batch_size]
    times = []
    for i in range(8):
        start = time.perf_counter()
        logits = model(batch, lab)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 1.0 / statistics.median(times)


def time_sampling(run_dir: Path, n: int, repeats: int = 2) -> dict[str, float]:
    run = Run.load(run_dir)
    accelerator = Accelerator(cpu=True)
    labels = None
    if run.prior.config.num_classes:
        labels = torch.arange(n) % len(run.class_names)
    best_codes, best_total = float("inf"), float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        sample_codes(run.prior, n, labels=labels, seeds=torch.arange(n))
        best_codes = min(best_codes, time.perf_counter() - start)
        start = time.perf_counter()
        run.sample(accelerator, n, run.label_plan(None, n), SamplingConfig(cfg_scale=1.0), seed=0)
        best_total = min(best_total, time.perf_counter() - start)
    return {f"sample_codes_s_n{n}": best_codes, f"sample_and_decode_s_n{n}": best_total}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="bench/mnist", help="stage-1 benchmark run with codes")
    p.add_argument("--priors", nargs="+", default=["transformer", "pixelcnn"])
    p.add_argument("--seconds", type=float, default=300, help="training wall-clock per prior")
    p.add_argument("--skip-training", action="store_true")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()

    source = Path(args.run)
    splits, meta = load_codes(source / "codes")
    train = splits["train"]
    results = {}
    for kind in args.priors:
        run = source.with_name(f"{source.name}-{kind}")
        train_cfg = TrainConfig(**TRAIN_DEFAULTS)
        result: dict[str, float | str] = {}
        if not args.skip_training:
            shutil.rmtree(run, ignore_errors=True)
            for part in ("vqvae", "codes"):
                shutil.copytree(source / part, run / part)
            fields = dict(codebook_size=meta.codebook_size, grid_height=meta.grid_height,
                          grid_width=meta.grid_width, num_classes=meta.num_classes)
            rate = steps_per_second(kind, train.codes, train.labels, train_cfg.batch_size, fields)
            steps = max(100, int(rate * args.seconds))
            train_cfg = TrainConfig(**{**TRAIN_DEFAULTS, "max_steps": steps, "eval_every": steps,
                                       "save_every": steps})
            start = time.perf_counter()
            metrics = train_prior(run, kind, train_cfg)
            result.update(train_wall_s=time.perf_counter() - start, steps=steps, **metrics)
        records = [r for r in JsonlLog(run / "prior" / "metrics.jsonl").read() if r["split"] == "train"]
        grids_per_s = statistics.median(r["samples_per_s"] for r in records[1:]) if len(records) > 1 else 0.0
        result["train_codes_per_s"] = grids_per_s * meta.grid_height * meta.grid_width
        tests = [r for r in JsonlLog(run / "prior" / "metrics.jsonl").read() if r["split"] == "test"]
        result.update(bits_per_code=tests[-1]["bits_per_code"], bits_per_image=tests[-1]["bits_per_image"])
        for n in (64, 1000):
            result.update(time_sampling(run, n))
        results[kind] = result
        (run / "benchmark_prior.json").write_text(json.dumps(result, indent=2) + "\n")
        print(kind, json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
    main()
