"""`vqgen sample`, `complete`, `reconstruct` and `encode`: codes and images from a trained run."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from stage1_vqvae.encode import encode_splits
from vqgen.arguments import given_options
from vqgen.commands.common import as_flags, at_least, prior_sampling, sampling_options
from vqgen.core.data.config import DataConfig
from vqgen.core.evaluate.measures import psnr
from vqgen.core.runtime.console import make_console, make_progress
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.runtime.processes import from_main
from vqgen.core.runtime.signals import terminate_interrupts
from vqgen.core.store.codes import CodeSplit, load_codes
from vqgen.core.store.configs import load_config
from vqgen.core.store.imageio import png_size, save_grid
from vqgen.core.store.lock import stage_lock
from vqgen.core.store.sample_set import sample_set
from vqgen.core.store.weights import ensure_writable
from vqgen.draws import LabelPlan
from vqgen.run import Run


def cmd_sample(args: argparse.Namespace) -> None:
    at_least(args, 1, "n", "batch_size", "nrow")
    sampling = sampling_options(args)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    console = make_console(accelerator.is_main_process)
    run = Run.load(args.run, allow_vqvae_mismatch=args.allow_vqvae_mismatch, device=accelerator.device)
    labels = run.label_plan(args.label, args.n, args.unconditional, seed=args.seed)
    [sampling] = prior_sampling(run, [sampling], console)
    batches = run.sample_batches(accelerator, args.n, labels, sampling, args.seed, args.batch_size)  # checked
    out = from_main(accelerator, Path(args.out) if args.out else run.outputs.next_samples_dir())
    ensure_writable(out)
    if out.is_dir() and any(out.iterdir()):
        raise VQGenError(f"--out {out} exists and is not empty; choose another folder")
    start = time.perf_counter()
    grid = run.vqvae.config.grid_shape
    with sample_set(accelerator, out, args.n, grid, _png_bytes(run), args.nrow) as samples, \
            make_progress(console, "sampling") as bar:
        task = bar.add_task("sampling", total=-(-args.n // accelerator.num_processes), metrics="")
        for indices, codes, images in batches:  # each process writes its own samples as they come
            samples.write(indices, codes, images)
            bar.advance(task, len(indices))
        seconds = time.perf_counter() - start
        samples.settings = {**vars(args), **as_flags(sampling), "processes": accelerator.num_processes,
                            "seconds": seconds,
                            "labels": _labels_list(labels, args.n)}
    console.print(f"{args.n} samples in {seconds:.2f} s -> {out}/grid.png, {out}/images/, {out}/codes.safetensors")
    if accelerator.is_main_process and not run.read_only:
        _log_samples(run, out, console)


def _labels_list(labels: LabelPlan, n: int) -> list[int] | None:
    """Each sample's label, for settings.json (computed once at the end, on the main process)."""
    drawn = labels.of(torch.arange(n))
    return None if drawn is None else drawn.tolist()


def _log_samples(run: Run, out: Path, console) -> None:
    """The sample grid to the tracker the prior trained with (TensorBoard, W&B), if any; a failure warns."""
    from vqgen.core.report import trackers
    from vqgen.core.store.imageio import load_png
    from vqgen.core.store.layout import SampleSetDir

    try:
        tracker = trackers.log_image(run.layout.prior, "samples/grid", load_png(SampleSetDir(out).grid))
    except VQGenError as err:
        console.print(f"[bold yellow]warning:[/] the samples were not logged: {err}")
        return
    if tracker:
        console.print(f"sample grid logged to {tracker} in {run.layout.prior.logs}")


def _png_bytes(run: Run) -> int:
    """Bytes of one decoded image as a PNG, for the disk estimate: random codes, busier than most samples."""
    cfg = run.vqvae.config
    codes = torch.randint(cfg.codebook_size, (1, *cfg.grid_shape), generator=torch.Generator().manual_seed(0))
    return png_size(run.decode(codes)[0])


def cmd_reconstruct(args: argparse.Namespace) -> None:
    at_least(args, 1, "n")
    console = make_console()
    run = Run.load(args.run, need_prior=False)
    out = Path(args.out) if args.out else run.outputs.reconstructions
    ensure_writable(out.parent)
    split = getattr(run.data(), args.split)
    images = split.take(range(min(args.n, len(split))))  # only these are decoded, when the split is streamed
    recons, errors, _ = run.reconstruct(images)
    save_grid(torch.cat([images, recons]), out, nrow=len(images))
    mse = errors.mean().item()
    console.print(f"{len(images)} {args.split} images: MSE {mse:.5f}, PSNR {psnr(mse):.2f} dB -> {out}")


def cmd_encode(args: argparse.Namespace) -> None:
    at_least(args, 1, "batch_size")
    accelerator = Accelerator()
    console = make_console(accelerator.is_main_process)
    run = Run.load(args.run, need_prior=False)
    if run.read_only:
        raise VQGenError(f"--run {args.run} is an exported model, which is only read: `vqgen encode` writes code "
                         "grids into a run directory (train one with `vqgen train vqvae`)")
    # one writer: refused while stage 1 trains (it encodes at its end) or another encode runs
    with stage_lock(run.layout.vqvae, "encoding"), terminate_interrupts():
        run.to(accelerator.device)
        data_cfg = load_config(DataConfig, run.layout.vqvae.data_config)
        given = given_options(args, DataConfig)
        if given:
            data_cfg = dataclasses.replace(data_cfg, **given)
        with accelerator.main_process_first():
            data = run.data(data_cfg)
        encode_splits(accelerator, run.vqvae, data, data_cfg, run.layout, args.batch_size, console)


def cmd_complete(args: argparse.Namespace) -> None:
    at_least(args, 1, "n")
    sampling = sampling_options(args)
    console = make_console()
    run = Run.load(args.run, allow_vqvae_mismatch=args.allow_vqvae_mismatch)
    out = Path(args.out) if args.out else run.outputs.completions
    ensure_writable(out.parent)
    if args.keep_rows is not None and not 0 <= args.keep_rows <= run.prior.config.grid_height:
        raise VQGenError(f"--keep-rows must be in [0, {run.prior.config.grid_height}], got {args.keep_rows}")
    [sampling] = prior_sampling(run, [sampling], console)
    if run.read_only:  # an exported model carries no code grids: encode the test images
        data = run.data()
        grids = run.encode(data.test.take(range(min(args.n, len(data.test)))))
        test = CodeSplit(grids, None if run.source.pseudo_labels else data.test.labels)
    else:
        test = load_codes(run.layout.codes)[0]["test"]
    codes = test.codes[: args.n].long()
    labels = test.labels[: args.n] if run.prior.config.num_classes and test.labels is not None else None
    keep = args.keep_rows if args.keep_rows is not None else codes.shape[1] // 2
    completed, images = run.complete(codes, keep, labels, seed=args.seed, sampling=sampling)
    originals = run.decode(codes)
    save_grid(torch.cat([originals, images]), out, nrow=len(codes))
    console.print(f"{len(codes)} completions keeping {keep} of {codes.shape[1]} code rows "
                  f"(top: decoded originals, bottom: completions) -> {out}")
