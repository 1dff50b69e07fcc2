"""Priors side by side on the same codes: train each variant on one stage-1 run, then score its samples.

    python scripts/benchmarks/priors.py --run bench/runs/shapes --judge bench/judges/shapes --out bench/priors/shapes \
        --variant transformer=--prior,transformer --variant masked=--prior,masked --steps 4,8,12,16,32 --inpaint

Each --variant NAME=ARGS (ARGS: options of `vqgen train prior`, comma-separated) trains a prior into
OUT/NAME/ (a copy of RUN's vqvae/ and codes/), and records its wall-clock and best held-out number. Then, for
each variant, --samples samples are scored by the dataset's judge (kept in --judge and shared by every variant,
so all are judged alike) at the default sampling settings; a masked prior once per --steps value (--samples 0:
timing only), on the GPU when there is one. Sampling time per image is timed there (on a CPU with one thread),
after one untimed batch: in one batch of
--time-samples samples (throughput), and drawing --latency-samples images one at a time (latency). With --inpaint, each
variant also redraws a centre box of half the test images' area (the central ceil(side/sqrt(2)) code rows and
columns) and the inpainted images are scored against the test split, beside the reconstructions (the ceiling).
Each variant's test grids (the first --context-grids) are also scored code by code against how much of the grid it
sees (`context_bits`): one random code per grid with every other code visible, the same positions for every
variant (a raster prior by Bayes over its joint, p(code = k | the rest) proportional to p(grid with code k); a
masked prior directly); a raster prior's bits per code in its own order; a masked prior's bits per hidden code
at hidden shares 10 % ... 100 %. Results: OUT/priors.json (and a sample grid per variant and setting).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from einops import rearrange, repeat
from torch import Tensor, nn

from stage2_prior.config import SamplingConfig
from stage2_prior.contract import grid_nll
from stage2_prior.masked import masked_cross_entropy
from vqgen.cli import main as vqgen
from vqgen.core.evaluate import quality
from vqgen.core.evaluate.measures import bits
from vqgen.core.store.codes import load_codes
from vqgen.core.store.imageio import save_grid
from vqgen.core.store.jsonl import JsonlLog
from vqgen.core.store.layout import RunLayout
from vqgen.draws import sample_seeds
from vqgen.run import Run, judging_images


def train(run: Path, out: Path, name: str, args: list[str], seed: int) -> dict:
    """A copy of the run's stage 1 and codes, a prior trained into it; wall-clock and its best test metric."""
    target = out / name
    if not (target / "prior" / "model.safetensors").is_file():
        shutil.rmtree(target, ignore_errors=True)
        for part in ("vqvae", "codes"):
            shutil.copytree(run / part, target / part, ignore=shutil.ignore_patterns("state", ".lock"))
        start = time.perf_counter()
        if vqgen(["train", "prior", "--run", str(target), "--seed", str(seed), "--no-report", *args]) != 0:
            sys.exit(f"error: training {name} failed")
        (target / "train_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    tests = [r for r in JsonlLog(RunLayout(target).prior.metrics).read() if r.get("split") == "test"]
    best = tests[-1]
    metric = next(k[5:] for k in best if k.startswith("best_") and k != "best_step")
    seconds = target / "train_seconds.txt"  # absent for a prior trained elsewhere
    return {"name": name, "args": args, "train_seconds": float(seconds.read_text()) if seconds.is_file() else None,
            "steps": tests[-1]["step"], "best_step": best["best_step"], metric: best[f"best_{metric}"]}


def time_sampling(run: Run, accelerator: Accelerator, sampling: SamplingConfig, n: int,
                  batch_size: int | None = None) -> float:
    """Seconds per image to draw and decode n samples in batches of batch_size (default: one batch of n), after
    one untimed batch."""
    batch_size = batch_size or n
    labels = run.label_plan(None, n)
    run.sample(accelerator, min(n, batch_size, 8), labels, sampling, seed=99, batch_size=batch_size)
    start = time.perf_counter()
    run.sample(accelerator, n, labels, sampling, seed=1, batch_size=batch_size)
    return (time.perf_counter() - start) / n


def centre_box(h: int, w: int) -> torch.Tensor:
    """(h, w) bool: the central box of about half the grid's area, ceil(side / sqrt 2) codes a side."""
    bh, bw = math.ceil(h / math.sqrt(2)), math.ceil(w / math.sqrt(2))
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[(h - bh) // 2:(h - bh) // 2 + bh, (w - bw) // 2:(w - bw) // 2 + bw] = True
    return mask


def inpaint_scores(run: Run, n: int, sampling: SamplingConfig, seed: int) -> dict:
    """Redraw the centre box of n test images; the in-domain FID of the results and of the reconstructions."""
    data = run.data()
    judge = run.judge(data)
    test_images, test_labels = judging_images(data.test, seed=seed)
    reference = quality.reference_of(judge, test_images, test_labels)
    images = data.test.take(range(min(n, len(data.test))))
    labels = None if data.test.labels is None or run.source.pseudo_labels else data.test.labels[:len(images)]
    recon, _, codes = run.reconstruct(images)
    hole = centre_box(*codes.shape[1:])
    keep = (~hole).expand(codes.shape).clone()
    filled = run.fill(len(codes), labels if run.prior.config.num_classes else None,
                      sample_seeds(seed, torch.arange(len(codes))), sampling, codes, keep)
    inpainted = run.decode(filled)
    return {"hole_share": float(hole.float().mean()),
            "inpainted": quality.sample_quality(judge, inpainted, labels, reference),
            "reconstructed": quality.sample_quality(judge, recon, labels, reference)}, inpainted


HIDDEN_SHARES = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
CANDIDATES = 256  # grids scored at once by `raster_one_hidden_bits`: bounds its (c, h, w, K) logits


def one_hidden_positions(n: int, t: int, seed: int) -> Tensor:
    """(n,) one raster position per grid, a function of (n, t, seed) alone: every variant is scored at the same."""
    return torch.randint(t, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def raster_one_hidden_bits(prior: nn.Module, codes: Tensor, labels: Tensor | None, positions: Tensor) -> float:
    """Mean bits of code `positions[j]` of grid j given every other code of it, under a raster prior's joint:
    p(x_i = k | x_-i) = p(x with x_i = k) / sum over k' (each grid scored with all K codes in its place)."""
    k = prior.config.codebook_size
    total = 0.0
    for j, pos in enumerate(positions.tolist()):
        joint = []  # log p(grid j with code c at pos) for every c, CANDIDATES grids at a time
        for candidates in torch.arange(k, device=codes.device).split(CANDIDATES):
            grids = repeat(codes[j].flatten(), "t -> c t", c=len(candidates)).clone()
            grids[:, pos] = candidates
            grids = rearrange(grids, "c (h w) -> c h w", h=codes.shape[1])
            joint.append(-grid_nll(prior, grids, None if labels is None else labels[j].expand(len(candidates))))
        total -= F.log_softmax(torch.cat(joint), dim=0)[codes[j].flatten()[pos]].item()
    return bits(total / len(positions))


@torch.no_grad()
def masked_bits(prior: nn.Module, codes: Tensor, labels: Tensor | None, mask: Tensor) -> float:
    """Mean bits of a masked prior over the codes hidden by `mask` (n, h, w), each seeing the grid's others."""
    return bits(masked_cross_entropy(prior(codes, labels, mask), codes, mask).item())


@torch.no_grad()
def context_bits(run: Run, grids: int, seed: int) -> dict:
    """How well the prior predicts the first `grids` test grids' codes with more or less of the grid in view."""
    prior = run.need_prior()
    cfg = prior.config
    test = load_codes(run.layout.codes)[0]["test"]
    device = next(prior.parameters()).device
    codes = test.codes[:grids].long().to(device)
    labels = test.condition_ids[:grids].to(device) if cfg.num_classes else None
    n, t = len(codes), cfg.seq_len
    positions = one_hidden_positions(n, t, seed)
    one = torch.zeros(n, t, dtype=torch.bool, device=device)
    one[torch.arange(n), positions] = True
    one = rearrange(one, "n (h w) -> n h w", h=cfg.grid_height)
    if run.kind.raster:
        return {"grids": n, "one_hidden": raster_one_hidden_bits(prior, codes, labels, positions),
                "raster_order": bits(grid_nll(prior, codes, labels).mean().item() / t)}
    keys = torch.rand(n, t, generator=torch.Generator().manual_seed(seed + 1))
    ranks = keys.argsort(dim=1).argsort(dim=1).to(device)
    shares = {f"{share:g}": masked_bits(prior, codes, labels,
                                        rearrange(ranks < max(1, round(share * t)), "n (h w) -> n h w",
                                                  h=cfg.grid_height))
              for share in HIDDEN_SHARES}
    return {"grids": n, "one_hidden": masked_bits(prior, codes, labels, one), "hidden_share": shares}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a run with a trained stage 1 and its codes")
    p.add_argument("--out", type=Path, required=True, help="where the variants' runs and priors.json go")
    p.add_argument("--judge", type=Path, required=True, help="the dataset's judge folder (trained once if missing)")
    p.add_argument("--variant", action="append", required=True,
                   help="NAME=ARGS: a prior trained with `vqgen train prior ARGS` (ARGS comma-separated)")
    p.add_argument("--samples", type=int, default=1000,
                   help="samples scored per setting; 0: timing only (default: 1000)")
    p.add_argument("--steps", default="8", help="decoding steps of a masked prior, comma list (default: 8)")
    p.add_argument("--time-samples", type=int, default=64, help="samples timed in one batch per setting (default: 64)")
    p.add_argument("--latency-samples", type=int, default=8,
                   help="samples timed one at a time per setting (default: 8; 0: none)")
    p.add_argument("--inpaint", action="store_true", help="also score inpainting a centre box of half the area")
    p.add_argument("--context-grids", type=int, default=200,
                   help="test grids scored code by code in `context_bits` (default: 200; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="training and sampling seed (default: 0)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.context_grids < 0:
        sys.exit(f"error: --context-grids must be >= 0, got {args.context_grids}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                         + (torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"),
              "torch": torch.__version__, "run": str(args.run), "samples": args.samples, "variants": []}
    steps = [int(s) for s in args.steps.split(",")]
    accelerator = Accelerator()  # the GPU when there is one
    for spec in args.variant:
        name, _, options = spec.partition("=")
        record = train(args.run, args.out, name, [o for o in options.split(",") if o], args.seed)
        target = args.out / name
        if (args.judge / "model.safetensors").is_file() and not RunLayout(target).judge.trained:
            shutil.copytree(args.judge, RunLayout(target).judge.path)
        run = Run.load(target, device=accelerator.device)
        if args.context_grids:
            record["context_bits"] = context_bits(run, args.context_grids, args.seed)
            print(json.dumps({"variant": name, "context_bits": record["context_bits"]}), flush=True)
        settings = [run.sampling(SamplingConfig(steps=s))  # with the prior's own guidance defaults
                    for s in ([None] if run.kind.raster else steps)]
        record["settings"] = []
        for sampling in settings:
            start = time.perf_counter()
            scores = {}
            if args.samples:
                scores = run.sample_quality(accelerator, args.samples, sampling=sampling, seed=args.seed)
            seconds = time.perf_counter() - start
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            per_image = time_sampling(run, accelerator, sampling, args.time_samples)
            latency = (time_sampling(run, accelerator, sampling, args.latency_samples, 1) if args.latency_samples
                       else None)
            torch.set_num_threads(threads)
            record["settings"].append({"steps": sampling.steps, "cfg": sampling.cfg_scale,
                                       "cfg_schedule": sampling.cfg_schedule, "score_seconds": seconds,
                                       "seconds_per_image": per_image, "seconds_per_image_one_at_a_time": latency,
                                       **scores})
            _, images = run.sample(accelerator, 64, run.label_plan(None, 64), sampling, seed=args.seed)
            save_grid(images, args.out / f"{name}-steps{sampling.steps or 0}.png", nrow=8)
            print(json.dumps({"variant": name, **record["settings"][-1]}), flush=True)
        if args.inpaint and args.samples:
            record["inpaint"], inpainted = inpaint_scores(run, min(args.samples, 1000), settings[0], args.seed)
            save_grid(inpainted[:64], args.out / f"{name}-inpainted.png", nrow=8)
        if not (args.judge / "model.safetensors").is_file() and RunLayout(target).judge.trained:
            shutil.copytree(RunLayout(target).judge.path, args.judge, dirs_exist_ok=True)
        result["variants"].append(record)
        (args.out / "priors.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
