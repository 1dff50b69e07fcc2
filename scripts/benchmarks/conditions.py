"""What a labelled dataset's prior conditions on, side by side on one stage 1: the classes alone, clusters
within each class, clusters of the codes alone (the labels hidden).

    python scripts/benchmarks/conditions.py --run bench/runs/o32 --out bench/conditions/o32 --prior-steps 1400 \
        --condition labels=--class-clusters,0 --condition both4=--class-clusters,4 \
        --condition clusters=--label-column,none

Each --condition NAME=ARGS (ARGS: options of `vqgen encode`, comma-separated) copies RUN's vqvae/ into
OUT/NAME/, dumps the codes with those options, trains a prior there (`vqgen train prior`, defaults plus
--prior-steps and --prior-args), and scores --samples samples over --seeds sampling seeds with `vqgen eval`
at the default sampling settings. Every condition is judged by one judge (trained for the first and copied
to the others), so all are judged alike. Prints a markdown table (in-domain FID per seed and against the
reconstructions, class accuracy for the requested class, coverage, near-copy shares beside held-out
images', test bits per code, wall-clock of encoding and training) and writes it to OUT/conditions.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

from vqgen.cli import main as vqgen
from vqgen.core.store.jsonl import JsonlLog


def condition(run: Path, out: Path, args: list[str], prior_args: list[str], judge: Path | None,
              samples: int, seeds: int, judge_steps: int | None) -> dict:
    """Encode, train and score one condition in `out`; its row of the table."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(run / "vqvae", out / "vqvae", ignore=shutil.ignore_patterns("state", ".lock"))
    start = time.perf_counter()
    for command in (["encode", "--run", str(out), *args],
                    ["train", "prior", "--run", str(out), "--no-report", *prior_args]):
        if vqgen(command) != 0:
            sys.exit(f"error: vqgen {' '.join(command)} failed")
    seconds = time.perf_counter() - start
    if judge is not None:
        shutil.copytree(judge, out / "judge")
    scoring = ["eval", "--run", str(out), "--samples", str(samples), "--seeds", str(seeds)]
    if judge_steps is not None:
        scoring += ["--judge-steps", str(judge_steps)]
    if vqgen(scoring) != 0:
        sys.exit(f"error: vqgen {' '.join(scoring)} failed")
    record = JsonlLog(out / "evaluations.jsonl").read()[-1]
    tests = [r for r in JsonlLog(out / "prior" / "metrics.jsonl").read() if r.get("split") == "test"]
    fids = [r["samples"]["fid"] for r in record["per_seed"] or [record]]
    return {"fid_per_seed": fids, "samples": record["samples"], "reconstructed": record["reconstructed"],
            "bits_per_code": min(r["bits_per_code"] for r in tests), "encode_and_train_s": seconds}


def row(name: str, r: dict) -> str:
    s, ceiling = r["samples"], r["reconstructed"]["fid"]
    fid = " / ".join(f"{f:.3f}" for f in r["fid_per_seed"])
    accuracy = s.get("class_accuracy")
    return (f"| {name} | {fid} ({s['fid'] / ceiling:.2f}× the reconstructions' {ceiling:.3f}) | "
            f"{'—' if accuracy is None else f'{accuracy:.3f}'} | {s['coverage']:.3f} | "
            f"{s['near_copies']:.3f} / {s['near_copies_pixels']:.3f} (held-out {s['near_copies_heldout']:.3f} / "
            f"{s['near_copies_heldout_pixels']:.3f}) | {r['bits_per_code']:.3f} | {r['encode_and_train_s']:.0f} s |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path, help="a run with a trained VQ-VAE on labelled data")
    p.add_argument("--out", required=True, type=Path, help="one folder per condition goes here")
    p.add_argument("--condition", action="append", required=True, metavar="NAME=ARGS",
                   help="a name and `vqgen encode` options, comma-separated (repeat)")
    p.add_argument("--prior-steps", type=int, default=None, help="the priors' --max-steps (default: sized)")
    p.add_argument("--prior-args", default="",
                   help="more options for `vqgen train prior`, comma-separated (--prior-args=--dropout,0.1)")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--judge-steps", type=int, help="judge training steps (default: vqgen eval's, 600)")
    args = p.parse_args(argv)
    args.conditions = {}
    for spec in args.condition:
        name, _, options = spec.partition("=")
        if not name or name in args.conditions:
            p.error(f"--condition needs a new NAME=ARGS, got {spec!r}")
        args.conditions[name] = [o for o in options.split(",") if o]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    conditions = args.conditions
    if not (args.run / "vqvae" / "model.safetensors").is_file():
        sys.exit(f"error: --run {args.run} has no trained VQ-VAE")
    prior_args = [o for o in args.prior_args.split(",") if o]
    prior_args += ["--max-steps", str(args.prior_steps)] if args.prior_steps else []
    results, judge = {}, None
    for name, options in conditions.items():
        results[name] = condition(args.run, args.out / name, options, prior_args, judge, args.samples,
                                  args.seeds, args.judge_steps)
        judge = judge or args.out / name / "judge"
        print(f"{name}: done", flush=True)
    print("| conditioned on | in-domain FID per seed | class accuracy | coverage | near-copies (judge / pixels) "
          "| test bits per code | encode + prior |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(row(name, r))
    (args.out / "conditions.json").write_text(json.dumps(
        {"machine": platform.processor() or platform.machine(), "conditions": conditions, "results": results},
        indent=1))


if __name__ == "__main__":
    main()
