"""Coarse-first codes: does a raster prior draw better samples when it first draws a coarse plan of the grid?

    python scripts/benchmarks/coarse_first.py build --run RUN --out OUT [--top-codes 64] [--pool 2]
    python scripts/train_prior.py --run OUT --allow-vqvae-mismatch
    python scripts/benchmarks/coarse_first.py score --run RUN --out OUT [--samples 1000] [--seeds 0,1]

The lever the hierarchical codes of VQ-VAE-2 (Razavi et al. 2019) stand for, measured without a second
stage 1, so the decoder and so the ceiling (the reconstructions' FID) stay those of RUN: each grid of RUN's
codes gets a top grid, a pool x pool smaller one, whose codes are the k-means clusters (`--top-codes`
of them, fit on the training grids) of the means of the codebook vectors under each top cell. The prior
of OUT learns top then bottom as one raster sequence: the top grid's codes (ids K ...) laid out in the
first rows of a taller grid, then the bottom grid's. So it first draws the layout of the image, then its
codes knowing the layout, and the pair of priors of VQ-VAE-2 is one Transformer. Unlike VQ-VAE-2's, this
top grid holds nothing the bottom one does not: it is a plan drawn first, which is the part of the lever a
small folder's prior may lack. `score` draws the samples (each position restricted to its grid's codes),
decodes the bottom grids through RUN's VQ-VAE and scores them with RUN's judge as `vqgen eval` does: the
in-domain FID, class accuracy, coverage, precision/recall and near-copies, per sampling seed.
Results go to OUT/coarse_first.json and are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from einops import rearrange, reduce
from torch import Tensor, nn

from stage1_vqvae.quantizer import kmeans, nearest_codes
from stage2_prior.config import DEFAULT_CFG
from stage2_prior.registry import load_prior
from stage2_prior.sampling import sample_codes
from vqgen.core.evaluate import quality
from vqgen.core.store.codes import CodesWriter, load_codes
from vqgen.core.store.imageio import save_grid
from vqgen.core.store.layout import RunLayout
from vqgen.draws import sample_seeds
from vqgen.run import Run


def pooled_vectors(run: Run, codes: Tensor, pool: int) -> Tensor:
    """(n, h, w) codes -> (n, h / pool, w / pool, d): the mean codebook vector (as the decoder reads it) of
    each pool x pool cell."""
    with torch.no_grad():
        z = torch.cat([run.vqvae.quantizer.decode_indices(c.long()) for c in codes.split(1024)])  # (n, d, h, w)
    return reduce(z, "n d (h p1) (w p2) -> n h w d", "mean", p1=pool, p2=pool)


def stacked(top: Tensor, bottom: Tensor, k: int, width: int) -> Tensor:
    """(n, th, tw) top codes and (n, h, w) bottom codes -> (n, h + th * tw / w, w): the top codes (shifted to
    ids k ...) in raster order in the first rows, then the bottom grid."""
    sequence = torch.cat([rearrange(top, "n a b -> n (a b)") + k, rearrange(bottom.long(), "n h w -> n (h w)")], 1)
    return rearrange(sequence, "n (h w) -> n h w", w=width)


def build(run_dir: Path, out: Path, top_codes: int, pool: int, seed: int) -> dict:
    """OUT/codes: RUN's code dump with each grid's top codes drawn first (see the module's docstring)."""
    run = Run.load(run_dir, need_prior=False)
    splits, meta = load_codes(RunLayout(run_dir).codes)
    h, w = meta.grid_height, meta.grid_width
    if h % pool or w % pool or (h // pool) * (w // pool) % w:
        raise SystemExit(f"a {h}x{w} grid does not pool by {pool} into whole rows of {w} codes")
    train = pooled_vectors(run, splits["train"].codes, pool)
    flat = rearrange(train, "n a b d -> (n a b) d")
    centroids = kmeans(flat, top_codes, iters=25, generator=torch.Generator().manual_seed(seed))
    writer = CodesWriter(RunLayout(out).codes)
    used = {}
    for name, split in splits.items():
        vectors = train if name == "train" else pooled_vectors(run, split.codes, pool)
        top = nearest_codes(rearrange(vectors, "n a b d -> (n a b) d"), centroids).view(vectors.shape[:3])
        used[name] = int(top.unique().numel())
        writer.add(name, stacked(top, split.codes, meta.codebook_size, w))
    top_rows = (h // pool) * (w // pool) // w
    writer.finish(dataclasses.replace(meta, codebook_size=meta.codebook_size + top_codes, grid_height=h + top_rows),
                  {name: split.labels for name, split in splits.items()},
                  {name: split.conditions for name, split in splits.items()})
    info = {"run": str(run_dir), "top_codes": top_codes, "pool": pool, "top_rows": top_rows,
            "bottom_codes": meta.codebook_size, "grid": [h, w], "top_codes_used": used}
    (out / "coarse_first_codes.json").write_text(json.dumps(info, indent=1))
    return info


class Restricted(nn.Module):
    """A raster prior over stacked grids whose draws keep to each part's own codes: top ids in the first
    `top_positions` positions, bottom ids after them (a code of the other part gets -1e4 added to its logit)."""

    def __init__(self, prior: nn.Module, top_positions: int, bottom_codes: int):
        super().__init__()
        self.prior, self.config = prior, prior.config
        self.top_positions, self.bottom_codes = top_positions, bottom_codes

    def start(self, labels: Tensor | None, batch_size: int):
        return self.prior.start(labels, batch_size)

    def step(self, state, codes: Tensor, pos: int):
        logits, state = self.prior.step(state, codes, pos)
        bias = torch.zeros(logits.shape[-1], device=logits.device, dtype=logits.dtype)
        if pos < self.top_positions:
            bias[: self.bottom_codes] = -1e4
        else:
            bias[self.bottom_codes:] = -1e4
        return logits + bias, state


def score(run_dir: Path, out: Path, samples: int, seeds: list[int], cfg_scale: float, batch_size: int) -> dict:
    """Sample OUT's prior, decode the bottom grids through RUN's VQ-VAE, score them with RUN's judge."""
    info = json.loads((out / "coarse_first_codes.json").read_text())
    run = Run.load(run_dir, need_prior=False)
    width, top_positions = info["grid"][1], info["top_rows"] * info["grid"][1]

    def decode(grids: Tensor) -> Tensor:
        bottom = rearrange(rearrange(grids, "n h w -> n (h w)")[:, top_positions:], "n (h w) -> n h w", w=width)
        return run.decode(bottom)

    results = score_stacked(run_dir, out, top_positions, info["bottom_codes"], decode, samples, seeds, cfg_scale,
                            batch_size)
    results["settings"].update(info)
    (out / "coarse_first.json").write_text(json.dumps(results, indent=1))
    return results


def score_stacked(run_dir: Path, out: Path, top_positions: int, bottom_codes: int,
                  decode: Callable[[Tensor], Tensor], samples: int, seeds: list[int], cfg_scale: float,
                  batch_size: int, reconstruct: Callable[[Tensor], Tensor] | None = None,
                  encode: Callable[[Tensor], Tensor] | None = None) -> dict:
    """Sample OUT's prior over stacked grids (each part kept to its own codes), `decode` the grids to uint8
    images, and score them with RUN's judge as `vqgen eval` does, per sampling seed. `reconstruct` (uint8
    images -> uint8 reconstructions): also score the reconstructions of `samples` training images
    ("reconstructed", the ceiling); `encode` (uint8 images -> stacked grids): also the code round trip of the
    samples and of the reconstructions. The first seed's first 64 samples go to OUT/samples.png."""
    run = Run.load(run_dir, need_prior=False)
    prior, _ = load_prior(RunLayout(out).prior)
    restricted = Restricted(prior.eval(), top_positions, bottom_codes)
    data = run.data()
    judge = run.judge(data)
    test_images, test_labels = quality.judging_images(data.test, seed=0)
    train_images, train_labels = quality.judging_images(data.train, seed=0)
    reference = quality.reference_of(judge, test_images, test_labels)
    classes = prior.config.num_classes
    results = {"settings": {"samples": samples, "cfg": cfg_scale}, "seeds": {}}
    if reconstruct is not None:
        results["reconstructed"] = quality.reference_floor(judge, train_images, reference,
                                                           n=min(samples, len(train_images)), seed=0,
                                                           train_labels=train_labels, transform=reconstruct)
        if encode is not None:  # the reconstructions' code round trip, on the first n training images
            picked = train_images[: min(samples, len(train_images))]
            kept = encode(reconstruct(picked)) == encode(picked)
            results["reconstructed"]["code_round_trip"] = float(kept.double().mean())
        print(f"reconstructions: fid {results['reconstructed']['fid']:.3f}")
    for seed in seeds:
        index = torch.arange(samples)
        labels = index % classes if classes else None
        start = time.perf_counter()
        grids = sample_codes(restricted, samples, labels=labels, cfg_scale=cfg_scale if classes else 1.0,
                             seeds=sample_seeds(seed, index), batch_size=batch_size)
        seconds = time.perf_counter() - start
        flat = rearrange(grids, "n h w -> n (h w)")
        assert int(flat[:, top_positions:].max()) < bottom_codes and int(flat[:, :top_positions].min()) >= bottom_codes
        images = decode(grids)
        if seed == seeds[0]:  # the first 64, for the eye: sample i drawn for class i mod classes
            save_grid(images[:64], out / "samples.png")
        scores = quality.sample_quality(judge, images, labels, reference)
        (copies, _), = quality.memorisation_scores(judge, [images], train_images, test_images, seed)
        if encode is not None:
            scores["code_round_trip"] = float((encode(images) == grids).double().mean())
        results["seeds"][seed] = {**scores, **copies, "sampling_s_per_image": seconds / samples}
        print(f"seed {seed}: fid {scores['fid']:.3f}  class accuracy {scores.get('class_accuracy', math.nan):.3f}  "
              f"near-copies {copies['near_copies']:.3f} (held-out {copies['near_copies_heldout']:.3f})")
    for key in ("fid", "class_accuracy", "coverage", "precision", "recall", "near_copies", "near_copies_heldout",
                "code_round_trip"):
        values = [r[key] for r in results["seeds"].values() if key in r]
        if values:
            results[key] = [statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0]
    return results


def seed_list(text: str) -> list[int]:
    try:
        return [int(seed) for seed in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 0,1") from None


def add_score_options(p: argparse.ArgumentParser) -> None:
    """What `score_stacked` draws: how many samples, with which seeds, guidance and batch."""
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seeds", type=seed_list, default=[0, 1], help="sampling seeds (default: 0,1)")
    p.add_argument("--cfg", type=float, default=DEFAULT_CFG)
    p.add_argument("--batch-size", type=int, default=250)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["build", "score"])
    p.add_argument("--run", type=Path, required=True, help="the stage-1 run (its VQ-VAE, codes and judge)")
    p.add_argument("--out", type=Path, required=True, help="the run folder of the coarse-first prior")
    p.add_argument("--top-codes", type=int, default=64, help="k-means clusters of the top grid's codes")
    p.add_argument("--pool", type=int, default=2, help="a top code stands for pool x pool bottom codes")
    add_score_options(p)
    p.add_argument("--seed", type=int, default=0, help="the k-means seed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.what == "build":
        print(json.dumps(build(args.run, args.out, args.top_codes, args.pool, args.seed)))
    else:
        result = score(args.run, args.out, args.samples, args.seeds, args.cfg, args.batch_size)
        print(json.dumps({k: v for k, v in result.items() if k != "seeds"}))


if __name__ == "__main__":
    main()
