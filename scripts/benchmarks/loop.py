"""The training loop against the bare model: how much of a prior's training time the loop adds.

    python scripts/benchmarks/loop.py --run runs/default                # after the quickstart's stage 1

On a run's codes, times (1) a bare loop of the default Transformer prior's forward, backward and AdamW step at
the quickstart's batch, and (2) `vqgen train prior` with the same model and batch at the quickstart's budget
(--steps, with its sized evaluation and save cadence), reading the loop's own per-window throughput and the time
its evaluations, saves and report took. Reports steps per second of both, their ratio, and the share of the
run spent evaluating. One thread, so the two are timed alike.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from stage2_prior.registry import PRIORS
from stage2_prior.train import CodesDataset, sized_defaults
from vqgen.cli import main as vqgen
from vqgen.core.data.loaders import make_loader
from vqgen.core.store.codes import load_codes
from vqgen.core.store.jsonl import JsonlLog
from vqgen.core.store.layout import RunLayout
from vqgen.core.training.config import TrainConfig
from vqgen.core.training.loop import make_optimizer


def bare_steps_per_second(run: Path, batch: int, steps: int) -> float:
    """Forward, backward and AdamW step of the default Transformer prior on the run's training codes."""
    splits, meta = load_codes(RunLayout(run).codes)
    kind = PRIORS["transformer"]
    config = kind.config(codebook_size=meta.codebook_size, grid_height=meta.grid_height,
                         grid_width=meta.grid_width, num_classes=meta.num_classes)
    model = kind.model(config).train()
    optimizer = make_optimizer(model, TrainConfig(learning_rate=1e-3, weight_decay=0.1))
    loader = make_loader(CodesDataset(splits["train"], meta.num_classes > 0), batch, train=True)
    batches = iter(loader)
    start = None
    for i in range(steps + 10):
        if i == 10:  # after a few warm-up steps
            start = time.perf_counter()
        try:
            b = next(batches)
        except StopIteration:
            batches = iter(loader)
            b = next(batches)
        loss, _ = kind.loss(model, b["codes"], b["label"] if meta.num_classes else None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - start)


def trainer_run(run: Path, steps: int, batch: int) -> dict:
    """`vqgen train prior` at `steps` x `batch` on a copy of the run: wall-clock, loop throughput, evaluations."""
    with tempfile.TemporaryDirectory(prefix="vqgen-loop-") as tmp:
        copy = Path(tmp) / "run"
        for part in ("vqvae", "codes"):
            shutil.copytree(run / part, copy / part, ignore=shutil.ignore_patterns("state", ".lock"))
        start = time.perf_counter()
        if vqgen(["train", "prior", "--run", str(copy), "--max-steps", str(steps), "--batch-size", str(batch)]):
            sys.exit("error: training failed")
        wall = time.perf_counter() - start
        records = JsonlLog(RunLayout(copy).prior.metrics).read()
    train = [r for r in records if r["split"] == "train"]
    tests = [r for r in records if r["split"] == "test"]
    window = statistics_median([r["samples_per_s"] for r in train]) / batch  # steps/s inside logging windows
    return {"wall_s": wall, "steps_per_s_overall": steps / wall, "steps_per_s_in_windows": window,
            "evaluations": len(tests)}


def statistics_median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("runs/default"), help="a run with stage 1 and its codes")
    p.add_argument("--steps", type=int, default=1800, help="training steps (default: 1800, the quickstart's)")
    p.add_argument("--batch-size", type=int, default=32, help="batch (default: 32, the prior's default)")
    p.add_argument("--bare-steps", type=int, default=300, help="steps of the bare loop timed (default: 300)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    _, meta = load_codes(RunLayout(args.run).codes)
    planned = sized_defaults(meta, {"max_steps": args.steps, "batch_size": args.batch_size})[1]
    bare = bare_steps_per_second(args.run, args.batch_size, args.bare_steps)
    loop = trainer_run(args.run, args.steps, args.batch_size)
    result = {"bare_steps_per_s": bare, **loop, "eval_every": planned["eval_every"],
              "loop_vs_bare_in_windows": loop["steps_per_s_in_windows"] / bare,
              "loop_vs_bare_overall": loop["steps_per_s_overall"] / bare,
              "outside_the_steps_share": 1 - args.steps / (loop["wall_s"] * loop["steps_per_s_in_windows"])}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
