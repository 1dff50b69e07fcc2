"""The training loop against the bare model: how much of each stage's training time the loop adds.

    python scripts/benchmarks/loop.py --stage 1                         # the quickstart's stage 1, on the shapes
    python scripts/benchmarks/loop.py --stage 2 --run runs/default      # the quickstart's prior, on a run's codes

Times (1) a bare loop of the model's forward, backward and AdamW step at the quickstart's batch: stage 1, the
quickstart's VQ-VAE (64 / 32 channels) on the built-in shapes; stage 2, the default Transformer prior on RUN's
codes; and (2) `vqgen train vqvae` (without the code dump) or `vqgen train prior` with the same model and batch
at the quickstart's budget (--steps, with its sized evaluation and save cadence), reading the loop's own
per-window throughput and the time its evaluations took. Reports steps per second of both, their ratio, the
share of the run spent outside the training steps, and the share spent evaluating (from each evaluation's
record back to its step's training record). One thread, so the two are timed alike.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from stage1_vqvae.config import TRAIN_DEFAULTS as STAGE1_TRAINING
from stage1_vqvae.config import VQVAEConfig
from stage1_vqvae.model import VQVAE
from stage2_prior.registry import PRIORS
from stage2_prior.train import CodesDataset, sized_defaults
from vqgen.cli import main as vqgen
from vqgen.core.data.config import DataConfig
from vqgen.core.data.images import ImageDataset, load_image_data
from vqgen.core.data.loaders import make_loader
from vqgen.core.store.codes import load_codes
from vqgen.core.store.jsonl import JsonlLog
from vqgen.core.store.layout import RunLayout
from vqgen.core.training.config import TrainConfig
from vqgen.core.training.loop import make_optimizer

QUICKSTART = {1: {"steps": 1000, "batch": 64}, 2: {"steps": 1800, "batch": 32}}
QUICKSTART_VQVAE = {"hidden_channels": 64, "res_channels": 32}  # the README's stage-1 model options


def timed_steps(step: Callable[[dict], None], loader, steps: int) -> float:
    """Steps per second of `step` over `steps` batches of `loader` (cycled), after 10 warm-up steps."""
    def batches() -> Iterator[dict]:
        while True:
            yield from loader
    source = batches()
    for _ in range(10):
        step(next(source))
    start = time.perf_counter()
    for _ in range(steps):
        step(next(source))
    return steps / (time.perf_counter() - start)


def bare_steps_per_second(stage: int, run: Path, batch: int, steps: int) -> float:
    """Forward, backward and AdamW step of the stage's quickstart model, nothing else."""
    if stage == 1:
        images = load_image_data(DataConfig())  # the built-in shapes
        model = VQVAE(VQVAEConfig(in_channels=images.channels, image_height=images.height,
                                  image_width=images.width, **QUICKSTART_VQVAE))
        model = model.to(memory_format=torch.channels_last).train()
        optimizer = make_optimizer(model, TrainConfig(**{**STAGE1_TRAINING, "batch_size": batch}))
        loader = make_loader(ImageDataset(images.train), batch, train=True)

        def loss(b: dict) -> torch.Tensor:
            return model(b["image"].contiguous(memory_format=torch.channels_last)).loss
    else:
        splits, meta = load_codes(RunLayout(run).codes)
        kind = PRIORS["transformer"]
        config = kind.config(codebook_size=meta.codebook_size, grid_height=meta.grid_height,
                             grid_width=meta.grid_width, num_classes=meta.num_classes)
        model = kind.model(config).train()
        optimizer = make_optimizer(model, TrainConfig(learning_rate=1e-3, weight_decay=0.1))
        loader = make_loader(CodesDataset(splits["train"], meta.num_classes > 0), batch, train=True)

        def loss(b: dict) -> torch.Tensor:
            return kind.loss(model, b["codes"], b["label"] if meta.num_classes else None)[0]

    def step(b: dict) -> None:
        loss(b).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return timed_steps(step, loader, steps)


def trainer_run(stage: int, run: Path, steps: int, batch: int, eval_every: int | None = None) -> dict:
    """The stage's `vqgen train` at `steps` x `batch` in a scratch run: wall-clock, loop throughput, evaluations."""
    with tempfile.TemporaryDirectory(prefix="vqgen-loop-") as tmp:
        copy = Path(tmp) / "run"
        if stage == 1:
            model = [a for k, v in QUICKSTART_VQVAE.items() for a in (f"--{k.replace('_', '-')}", str(v))]
            command = ["train", "vqvae", "--run", str(copy), "--no-encode", *model]
        else:
            for part in ("vqvae", "codes"):
                shutil.copytree(run / part, copy / part, ignore=shutil.ignore_patterns("state", ".lock"))
            command = ["train", "prior", "--run", str(copy)]
        start = time.perf_counter()
        cadence = ["--eval-every", str(eval_every), "--save-every", str(eval_every)] if eval_every else []
        if vqgen([*command, "--max-steps", str(steps), "--batch-size", str(batch), *cadence]):
            sys.exit("error: training failed")
        wall = time.perf_counter() - start
        layout = RunLayout(copy)
        records = JsonlLog((layout.vqvae if stage == 1 else layout.prior).metrics).read()
    train = [r for r in records if r["split"] == "train"]
    tests = [r for r in records if r["split"] == "test"]
    window = statistics.median_high([r["samples_per_s"] for r in train]) / batch  # steps/s inside logging windows
    logged = {r["step"]: r["time"] for r in train}  # an evaluation is written right after its step's train record
    evaluating = sum(r["time"] - logged[r["step"]] for r in tests if r["step"] in logged)
    return {"wall_s": wall, "steps_per_s_overall": steps / wall, "steps_per_s_in_windows": window,
            "evaluations": len(tests), "evaluation_s": evaluating, "evaluation_share": evaluating / wall}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, choices=(1, 2), default=2, help="which stage's loop (default: 2)")
    p.add_argument("--run", type=Path, default=Path("runs/default"),
                   help="stage 2: a run with stage 1 and its codes (default: runs/default)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: the quickstart's, 1000 for stage 1 and 1800 for stage 2)")
    p.add_argument("--batch-size", type=int, default=None, help="batch (default: 64 for stage 1, 32 for stage 2)")
    p.add_argument("--bare-steps", type=int, default=300, help="steps of the bare loop timed (default: 300)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="the trainer's evaluation and save cadence (default: sized to the data, as a user's run)")
    args = p.parse_args(argv)
    args.steps = args.steps or QUICKSTART[args.stage]["steps"]
    args.batch_size = args.batch_size or QUICKSTART[args.stage]["batch"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    result = {"stage": args.stage}
    if args.eval_every:
        result["eval_every"] = args.eval_every
    elif args.stage == 2:
        _, meta = load_codes(RunLayout(args.run).codes)
        result["eval_every"] = sized_defaults(meta, {"max_steps": args.steps, "batch_size": args.batch_size})[1][
            "eval_every"]
    bare = bare_steps_per_second(args.stage, args.run, args.batch_size, args.bare_steps)
    loop = trainer_run(args.stage, args.run, args.steps, args.batch_size, args.eval_every)
    result.update({"bare_steps_per_s": bare, **loop,
                   "loop_vs_bare_in_windows": loop["steps_per_s_in_windows"] / bare,
                   "loop_vs_bare_overall": loop["steps_per_s_overall"] / bare,
                   "outside_the_steps_share": 1 - args.steps / (loop["wall_s"] * loop["steps_per_s_in_windows"])})
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
