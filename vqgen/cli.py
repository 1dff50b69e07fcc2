"""`vqgen`: sample, reconstruct, encode, complete, info and eval on a trained run.

Argument parsing and output files only; the work is in `vqgen.pipeline`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.table import Table
from safetensors.torch import save_file

from vqgen import pipeline
from vqgen.arguments import Parser, add_config_options, exit_code, given_options
from vqgen.core.config import load_config, read_json, write_json_atomic
from vqgen.core.checkpoint import ensure_writable
from vqgen.core.console import make_console, make_progress
from vqgen.core.data.images import DataConfig
from vqgen.core.errors import VQGenError
from vqgen.core.imageio import save_grid, save_png
from vqgen.core.metrics import JsonlLog, psnr

EXAMPLES = {
    "sample": "vqgen sample --n 64\n  vqgen sample --run runs/mine --n 16 --label circle --cfg 2.0 --top-k 100\n"
              "  accelerate launch -m vqgen sample --n 1000 --batch-size 500",
    "reconstruct": "vqgen reconstruct --n 16\n  vqgen reconstruct --run runs/mine --split train",
    "encode": "vqgen encode\n  vqgen encode --run runs/mine --data ./more_images",
    "complete": "vqgen complete --n 8 --keep-rows 4",
    "info": "vqgen info --run runs/mine",
    "eval": "vqgen eval --run runs/mine",
}


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default: 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely codes")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1: off)")
    p.add_argument("--seed", type=int, default=0, help="sample i is seeded by (seed, i) (default: 0)")
    p.add_argument("--allow-vqvae-mismatch", action="store_true",
                   help="use a prior trained on another VQ-VAE's codes")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="vqgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog="examples:\n  " + EXAMPLES[name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--run", default="runs/default", help="run directory (default: runs/default)")
        return p

    p = command("sample", "draw images: prior -> codebook -> decoder")
    p.add_argument("--n", type=int, default=64, help="number of images (default: 64)")
    p.add_argument("--label", nargs="+", default=None,
                   help="class name(s) or id(s): one for all, or n (default: cycle through the classes)")
    p.add_argument("--unconditional", action="store_true",
                   help="sample a conditional prior without labels (its null class)")
    _add_sampling_options(p)
    p.add_argument("--batch-size", type=int, default=1000, help="samples per batch and process (default: 1000)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/samples/NNNN)")
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    p.add_argument("--nrow", type=int, default=8, help="images per row of the grid (default: 8)")

    p = command("reconstruct", "originals over reconstructions, with MSE and PSNR")
    p.add_argument("--n", type=int, default=16, help="number of images (default: 16)")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--out", default=None, help="output PNG (default: RUN/reconstructions.png)")

    p = command("encode", "(re)dump the code grids of a dataset with the run's VQ-VAE")
    p.add_argument("--batch-size", type=int, default=256)
    add_config_options(p, DataConfig, title="data (default: the data the run was trained on)")

    p = command("complete", "keep the top rows of real code grids, sample the rest")
    p.add_argument("--n", type=int, default=8, help="number of test images (default: 8)")
    p.add_argument("--keep-rows", type=int, default=None, help="code rows kept (default: half the grid)")
    _add_sampling_options(p)
    p.add_argument("--out", default=None, help="output PNG (default: RUN/completions.png)")

    command("info", "a table of the run: configs, data, metrics")
    command("eval", "recompute the test metrics of both stages")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = {"sample": cmd_sample, "reconstruct": cmd_reconstruct, "encode": cmd_encode,
               "complete": cmd_complete, "info": cmd_info, "eval": cmd_eval}[args.command]
    return exit_code(lambda: command(args))


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cfg_scale=args.cfg)


def _next_samples_dir(run: Path) -> Path:
    root = run / "samples"
    taken = [int(p.name) for p in root.glob("[0-9][0-9][0-9][0-9]")] if root.is_dir() else []
    return root / f"{max(taken, default=-1) + 1:04d}"


def cmd_sample(args: argparse.Namespace) -> None:
    for name in ("n", "batch_size", "nrow"):
        if getattr(args, name) < 1:
            raise VQGenError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    console = make_console(accelerator.is_main_process)
    run = pipeline.load_run(args.run, allow_vqvae_mismatch=args.allow_vqvae_mismatch)
    pipeline.run_on_device(run, accelerator.device)
    labels = pipeline.choose_labels(run, args.label, args.n, args.unconditional)
    out = Path(args.out) if args.out else _next_samples_dir(run.path)
    ensure_writable(out)
    if out.is_dir() and any(out.iterdir()):
        raise VQGenError(f"--out {out} exists and is not empty; choose another folder")
    start = time.perf_counter()
    with make_progress(console, "sampling") as bar:
        share = -(-args.n // accelerator.num_processes)  # this process's part of the n samples
        task = bar.add_task("sampling", total=share, metrics="")
        codes, images = pipeline.sample(run, accelerator, args.n, labels=labels, seed=args.seed,
                                        batch_size=args.batch_size, progress=lambda k: bar.advance(task, k),
                                        **_sampling_kwargs(args))
    seconds = time.perf_counter() - start
    if accelerator.is_main_process:
        settings = {**vars(args), "processes": accelerator.num_processes, "seconds": seconds,
                    "labels": None if labels is None else labels.tolist()}
        _write_samples(out, codes, images, settings, args.nrow)
        console.print(f"{args.n} samples in {seconds:.2f} s -> {out}/grid.png, {out}/images/, {out}/codes.safetensors")


def _write_samples(out: Path, codes: torch.Tensor, images: torch.Tensor, settings: dict, nrow: int) -> None:
    """Everything into a temporary folder first, then one rename: a crash leaves no half sample set."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_grid(images, tmp / "grid.png", nrow=nrow)
        for i, image in enumerate(images):
            save_png(image, tmp / "images" / f"{i:05d}.png")
        save_file({"codes": codes.to(torch.int16).contiguous()}, str(tmp / "codes.safetensors"))
        write_json_atomic(settings, tmp / "settings.json")
        if out.exists():
            if any(out.iterdir()):
                raise VQGenError(f"--out {out} exists and is not empty; choose another folder")
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cmd_reconstruct(args: argparse.Namespace) -> None:
    console = make_console()
    if args.n < 1:
        raise VQGenError(f"--n must be >= 1, got {args.n}")
    run = pipeline.load_run(args.run, need_prior=False)
    out = Path(args.out) if args.out else run.path / "reconstructions.png"
    ensure_writable(out.parent)
    data = pipeline.run_data(run)
    images = getattr(data, args.split).images[: args.n]
    recons, errors = pipeline.reconstruct(run, images)
    save_grid(torch.cat([images, recons]), out, nrow=len(images))
    mse = errors.mean().item()
    console.print(f"{len(images)} {args.split} images: MSE {mse:.5f}, PSNR {psnr(mse):.2f} dB -> {out}")


def cmd_encode(args: argparse.Namespace) -> None:
    from stage1_vqvae.encode import encode_splits

    accelerator = Accelerator()
    console = make_console(accelerator.is_main_process)
    run = pipeline.load_run(args.run, need_prior=False)
    pipeline.run_on_device(run, accelerator.device)
    given = given_options(args, DataConfig)
    override = None
    if given:
        saved = load_config(DataConfig, run.path / "vqvae" / "data_config.json")
        override = dataclasses.replace(saved, **given)
    with accelerator.main_process_first():
        data = pipeline.run_data(run, override)
    encode_splits(accelerator, run.vqvae, data, run.path, args.batch_size, console)


def cmd_complete(args: argparse.Namespace) -> None:
    from vqgen.core.codes import load_codes

    console = make_console()
    if args.n < 1:
        raise VQGenError(f"--n must be >= 1, got {args.n}")
    run = pipeline.load_run(args.run, allow_vqvae_mismatch=args.allow_vqvae_mismatch)
    out = Path(args.out) if args.out else run.path / "completions.png"
    ensure_writable(out.parent)
    splits, _ = load_codes(run.path / "codes")
    test = splits["test"]
    codes = test.codes[: args.n]
    labels = test.labels[: args.n] if run.prior.config.num_classes and test.labels is not None else None
    keep = args.keep_rows if args.keep_rows is not None else codes.shape[1] // 2
    completed, images = pipeline.complete(run, codes, keep, labels, seed=args.seed, **_sampling_kwargs(args))
    originals = pipeline.decode_codes(run, codes)
    save_grid(torch.cat([originals, images]), out, nrow=len(codes))
    console.print(f"{len(codes)} completions keeping {keep} of {codes.shape[1]} code rows "
                  f"(top: decoded originals, bottom: completions) -> {out}")


def cmd_info(args: argparse.Namespace) -> None:
    console = make_console()
    run = Path(args.run)
    if not (run / "vqvae" / "config.json").is_file():
        raise VQGenError(f"{run} is not a vqgen run (no vqvae/config.json)")
    table = Table(title=f"run {run}", show_lines=True)
    table.add_column("stage", style="bold")
    table.add_column("settings")
    table.add_column("latest test metrics")
    for stage in ("vqvae", "codes", "prior"):
        folder = run / stage
        if not folder.is_dir():
            table.add_row(stage, "not trained yet", "")
            continue
        config_file = folder / ("meta.json" if stage == "codes" else "config.json")
        config = read_json(config_file, f"{stage} config") if config_file.is_file() else {}
        settings = ", ".join(f"{k}={v}" for k, v in config.items() if k not in ("kind", "format_version", "split_sizes"))
        if stage == "vqvae" and (folder / "data_config.json").is_file():
            data = read_json(folder / "data_config.json", "data config")
            settings += f"\ndata: {data.get('source')}"
        tests = [r for r in JsonlLog(folder / "metrics.jsonl").read() if r.get("split") == "test"]
        metrics = ""
        if tests:
            last = tests[-1]
            metrics = f"step {last['step']}: " + ", ".join(
                f"{k} {v:.4g}" for k, v in last.items() if k not in ("split", "step", "time"))
        table.add_row(stage, settings, metrics)
    console.print(table)


def cmd_eval(args: argparse.Namespace) -> None:
    console = make_console()
    run = pipeline.load_run(args.run, need_prior=False)
    metrics = pipeline.evaluate(run)
    table = Table(title=f"test metrics of {run.path}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.5g}")
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
