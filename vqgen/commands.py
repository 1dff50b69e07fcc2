"""The work behind each `vqgen` command: load the run, call the pipeline, write the files.

`vqgen.cli` parses the arguments and imports this module only then, so `vqgen --help` never
imports torch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.table import Table

from stage1_vqvae.encode import encode_splits
from vqgen import pipeline
from vqgen.arguments import given_options
from vqgen.cli import DEFAULT_CFG
from vqgen.core import hub
from vqgen.core.agree import from_main, raise_together
from vqgen.core.checkpoint import ensure_writable
from vqgen.core.codes import CodeSplit, load_codes
from vqgen.core.config import load_config, read_json
from vqgen.core.console import make_console, make_progress
from vqgen.core.data.config import DataConfig
from vqgen.core.errors import VQGenError
from vqgen.core.export import check_export_target, export_run, locate_run
from vqgen.core.hub import checked_repo_id
from vqgen.core.interrupt import terminate_interrupts
from vqgen.core.imageio import png_size, save_grid
from vqgen.core.layout import SAMPLE_GRID, RunLayout
from vqgen.core.lock import stage_lock
from vqgen.core.metrics import JsonlLog, psnr
from vqgen.core.modelcard import model_card
from vqgen.core.samples import SampleSetWriter, discard_sample_set, finish_sample_set, start_sample_set


EXPORT_SAMPLES = 64  # drawn for the model card when the run has no sample grid


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    """The sampling options of the parsed command line."""
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cfg_scale=args.cfg)


def cmd_sample(args: argparse.Namespace) -> None:
    for name in ("n", "batch_size", "nrow"):
        if getattr(args, name) < 1:
            raise VQGenError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    console = make_console(accelerator.is_main_process)
    run = pipeline.load_run(args.run, allow_vqvae_mismatch=args.allow_vqvae_mismatch)
    pipeline.run_on_device(run, accelerator.device)
    labels = pipeline.choose_labels(run, args.label, args.n, args.unconditional, seed=args.seed)
    batches = pipeline.sample_batches(run, accelerator, args.n, labels=labels, seed=args.seed,
                                      batch_size=args.batch_size, **_sampling_kwargs(args))  # checked, not drawn
    out = from_main(accelerator, Path(args.out) if args.out else run.outputs.next_samples_dir())
    ensure_writable(out)
    if out.is_dir() and any(out.iterdir()):
        raise VQGenError(f"--out {out} exists and is not empty; choose another folder")
    tmp, error = None, None
    if accelerator.is_main_process:
        try:
            tmp = start_sample_set(out, args.n, run.vqvae.config.grid_shape, _png_bytes(run), args.nrow)
        except VQGenError as err:
            error = str(err)
    raise_together(accelerator, error, main_only=True)
    tmp = from_main(accelerator, tmp)
    start, writer = time.perf_counter(), None
    try:
        with terminate_interrupts():  # SIGTERM, like Ctrl-C, removes the temporary folder
            writer = SampleSetWriter(tmp, args.n)
            with make_progress(console, "sampling") as bar:
                task = bar.add_task("sampling", total=-(-args.n // accelerator.num_processes), metrics="")
                for indices, codes, images in batches:  # each process writes its own samples as they come
                    writer.write(indices, codes, images)
                    bar.advance(task, len(indices))
            writer.close()
            accelerator.wait_for_everyone()
            seconds = time.perf_counter() - start
            if accelerator.is_main_process:
                settings = {**vars(args), "processes": accelerator.num_processes, "seconds": seconds,
                            "labels": None if labels is None else labels.tolist()}
                finish_sample_set(tmp, out, args.n, args.nrow, settings)
    except BaseException:
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
        if accelerator.is_main_process:
            discard_sample_set(tmp)
        raise
    console.print(f"{args.n} samples in {seconds:.2f} s -> {out}/grid.png, {out}/images/, {out}/codes.safetensors")
    if accelerator.is_main_process and not run.read_only:
        _log_samples(run, out, console)


def _log_samples(run: pipeline.Run, out: Path, console) -> None:
    """The sample grid to the tracker the prior trained with (TensorBoard, W&B), if any; a failure warns."""
    from vqgen.core import trackers
    from vqgen.core.imageio import load_png
    from vqgen.core.layout import SampleSetDir

    try:
        tracker = trackers.log_image(run.layout.prior, "samples/grid", load_png(SampleSetDir(out).grid))
    except VQGenError as err:
        console.print(f"[bold yellow]warning:[/] the samples were not logged: {err}")
        return
    if tracker:
        console.print(f"sample grid logged to {tracker} in {run.layout.prior.logs}")


def _png_bytes(run: pipeline.Run) -> int:
    """Bytes of one decoded image as a PNG, for the disk estimate: random codes, busier than most samples."""
    cfg = run.vqvae.config
    codes = torch.randint(cfg.codebook_size, (1, *cfg.grid_shape), generator=torch.Generator().manual_seed(0))
    return png_size(pipeline.decode_codes(run, codes)[0])


def cmd_reconstruct(args: argparse.Namespace) -> None:
    if args.n < 1:
        raise VQGenError(f"--n must be >= 1, got {args.n}")
    console = make_console()
    run = pipeline.load_run(args.run, need_prior=False)
    out = Path(args.out) if args.out else run.outputs.reconstructions
    ensure_writable(out.parent)
    data = pipeline.run_data(run)
    split = getattr(data, args.split)
    images = split.take(range(min(args.n, len(split))))  # only these are decoded, when the split is streamed
    recons, errors, _ = pipeline.reconstruct(run, images)
    save_grid(torch.cat([images, recons]), out, nrow=len(images))
    mse = errors.mean().item()
    console.print(f"{len(images)} {args.split} images: MSE {mse:.5f}, PSNR {psnr(mse):.2f} dB -> {out}")


def cmd_encode(args: argparse.Namespace) -> None:
    accelerator = Accelerator()
    console = make_console(accelerator.is_main_process)
    run = pipeline.load_run(args.run, need_prior=False)
    if run.read_only:
        raise VQGenError(f"--run {args.run} is an exported model, which is only read: `vqgen encode` writes code "
                         "grids into a run directory (train one with scripts/train_vqvae.py)")
    # one writer: refused while stage 1 trains (it encodes at its end) or another encode runs
    with stage_lock(run.layout.vqvae, "encoding"), terminate_interrupts():
        pipeline.run_on_device(run, accelerator.device)
        given = given_options(args, DataConfig)
        override = None
        if given:
            saved = load_config(DataConfig, run.layout.vqvae.data_config)
            override = dataclasses.replace(saved, **given)
        with accelerator.main_process_first():
            data = pipeline.run_data(run, override)
        encode_splits(accelerator, run.vqvae, data, override or load_config(DataConfig, run.layout.vqvae.data_config),
                      run.layout, args.batch_size, console)


def cmd_complete(args: argparse.Namespace) -> None:
    if args.n < 1:
        raise VQGenError(f"--n must be >= 1, got {args.n}")
    console = make_console()
    run = pipeline.load_run(args.run, allow_vqvae_mismatch=args.allow_vqvae_mismatch)
    out = Path(args.out) if args.out else run.outputs.completions
    ensure_writable(out.parent)
    if args.keep_rows is not None and not 0 <= args.keep_rows <= run.prior.config.grid_height:
        raise VQGenError(f"--keep-rows must be in [0, {run.prior.config.grid_height}], got {args.keep_rows}")
    if run.read_only:  # an exported model carries no code grids: encode the test images
        data = pipeline.run_data(run)
        _, _, grids = pipeline.reconstruct(run, data.test.take(range(min(args.n, len(data.test)))))
        test = CodeSplit(grids, None if run.source.pseudo_labels else data.test.labels)
    else:
        test = load_codes(run.layout.codes)[0]["test"]
    codes = test.codes[: args.n].long()
    labels = test.labels[: args.n] if run.prior.config.num_classes and test.labels is not None else None
    keep = args.keep_rows if args.keep_rows is not None else codes.shape[1] // 2
    completed, images = pipeline.complete(run, codes, keep, labels, seed=args.seed, **_sampling_kwargs(args))
    originals = pipeline.decode_codes(run, codes)
    save_grid(torch.cat([originals, images]), out, nrow=len(codes))
    console.print(f"{len(codes)} completions keeping {keep} of {codes.shape[1]} code rows "
                  f"(top: decoded originals, bottom: completions) -> {out}")


def cmd_info(args: argparse.Namespace) -> None:
    console = make_console()
    run = locate_run(args.run).layout
    if not (run.vqvae.config.is_file() or run.prior.config.is_file()):
        raise VQGenError(f"{run.root} is not a vqgen run (no {run.vqvae.config.relative_to(run.root)} "
                         f"nor {run.prior.config.relative_to(run.root)})")
    table = Table(title=f"run {run.root}", show_lines=True)
    table.add_column("stage", style="bold")
    table.add_column("settings")
    table.add_column("test metrics: best (the weights in use) and latest")
    for name, config_file, metrics_file in (("vqvae", run.vqvae.config, run.vqvae.metrics),
                                            ("codes", run.codes_meta, None),
                                            ("prior", run.prior.config, run.prior.metrics)):
        if not config_file.parent.is_dir():
            table.add_row(name, "not trained yet", "")
            continue
        config = read_json(config_file, f"{name} config") if config_file.is_file() else {}
        settings = ", ".join(f"{k}={v}" for k, v in config.items() if k not in ("kind", "format_version", "split_sizes"))
        if name == "vqvae" and run.vqvae.data_config.is_file():
            settings += f"\ndata: {read_json(run.vqvae.data_config, 'data config').get('source')}"
        tests = [r for r in JsonlLog(metrics_file).read() if r.get("split") == "test"] if metrics_file else []
        table.add_row(name, settings, _test_summary(tests))
    console.print(table)


def _test_summary(tests: list[dict]) -> str:
    """The best evaluation (whose weights the stage keeps) and the latest one, from metrics.jsonl."""
    if not tests:
        return ""

    def line(record: dict) -> str:
        return f"step {record['step']}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in record.items()
            if k not in ("split", "step", "time", "best_step") and not k.startswith("best_"))

    last = tests[-1]
    best = next((r for r in tests if r["step"] == last.get("best_step")), last)
    return f"best {line(best)}" + ("" if best is last else f"\nlatest {line(last)}")


def cmd_eval(args: argparse.Namespace) -> None:
    if args.samples < 0 or args.samples == 1:
        raise VQGenError(f"--samples must be 0 (none) or >= 2, got {args.samples}")
    if args.judge_steps < 1:
        raise VQGenError(f"--judge-steps must be >= 1, got {args.judge_steps}")
    if args.inception and not args.samples:
        raise VQGenError("--inception scores samples: give --samples N as well")
    console = make_console()
    run = pipeline.load_run(args.run, need_prior=bool(args.samples), allow_vqvae_mismatch=args.allow_vqvae_mismatch)
    data = pipeline.run_data(run)
    metrics = pipeline.evaluate(run, data)
    table = Table(title=f"test metrics of {run.path}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.5g}")
    console.print(table)
    if not args.samples:
        return
    accelerator = Accelerator()
    pipeline.run_on_device(run, accelerator.device)
    sampling = _sampling_kwargs(args)
    scores = pipeline.sample_quality(run, accelerator, args.samples, data, seed=args.seed, batch_size=args.batch_size,
                                     retrain_judge=args.retrain_judge, inception=args.inception,
                                     judge_steps=args.judge_steps, closest_pairs=run.outputs.closest_pairs,
                                     **sampling)
    n_real = min(args.samples, len(data.train))
    table = Table(title=f"{args.samples} samples against the {len(data.test)} test images, beside {n_real} real "
                        "training images and their reconstructions",
                  caption="reconstructed: what samples would reach with a perfect prior (the VQ-VAE's ceiling)")
    for column in ("measure", "samples", "reconstructed", "real"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    for k, v in scores["samples"].items():
        others = (scores[part].get(k) for part in ("reconstructed", "real"))
        table.add_row(k, f"{v:.4g}", *("" if x is None else f"{x:.4g}" for x in others))
    console.print(table)
    if "near_copies_pixels" in scores["samples"]:  # the samples nearest to a training image, each beside it
        console.print(f"closest (sample, training image) pairs: {run.outputs.closest_pairs}")
    accuracy, chance = scores["samples"].get("judge_test_accuracy"), scores["samples"].get("judge_chance")
    if accuracy is not None and chance is not None and accuracy < min(2 * chance, (1 + chance) / 2):
        console.print(f"[bold yellow]warning:[/] the judge scores only {accuracy:.2f} on the test images (chance "
                      f"{chance:.2f}): its features say little about these images; trust the FID less")
    record = {"time": time.time(), "samples": args.samples, **sampling, "seed": args.seed, **scores}
    run.outputs.evaluations.parent.mkdir(parents=True, exist_ok=True)
    with run.outputs.evaluations.open("a") as f:
        f.write(json.dumps(record) + "\n")


def cmd_export(args: argparse.Namespace) -> None:
    console = make_console()
    repo = checked_repo_id(args.repo_id) if args.repo_id else None
    to = Path(args.to)
    names = _export(args, to, repo, console)
    console.print(f"exported {args.run} -> {to}/ ({len(names)} files: {', '.join(names)})\n"
                  f"load it with: vqgen sample --run {to}" + (f"; publish it with: vqgen push --run {args.run} "
                                                              f"--repo-id {repo}" if repo else ""))


def cmd_push(args: argparse.Namespace) -> None:
    console = make_console()
    repo = checked_repo_id(args.repo_id)
    if hub.offline():
        raise VQGenError(f"cannot push to {repo.repo_id!r}: offline mode (HF_HUB_OFFLINE=1)")
    with tempfile.TemporaryDirectory(prefix="vqgen-push-") as tmp:
        folder = Path(tmp) / repo.name
        names = _export(args, folder, repo, console)
        url = hub.upload(folder, repo, args.private, f"Upload {repo.name} with vqgen ({len(names)} files)")
    console.print(f"pushed {args.run} -> {url} ({len(names)} files)\nload it with: vqgen sample --run {repo}")


def _export(args: argparse.Namespace, to: Path, repo: hub.RepoId | None, console) -> list[str]:
    """Check the run and the target, load the run (both stages must belong together), draw a sample grid if the
    run has none, then write the exported folder."""
    location = locate_run(args.run)
    check_export_target(location.layout, to, args.overwrite)
    ensure_writable(to)
    run = pipeline.load_run(location)
    name = to.resolve().name

    def card(layout: RunLayout, names: list[str]) -> str:
        return model_card(layout, names, repo=str(repo) if repo else None, name=name, grid=SAMPLE_GRID in names)

    if location.layout.newest_sample_grid() is not None:
        return export_run(location.layout, to, card, args.overwrite)
    with tempfile.TemporaryDirectory(prefix="vqgen-export-") as tmp:
        grid = Path(tmp) / SAMPLE_GRID
        labels = pipeline.choose_labels(run, None, EXPORT_SAMPLES)
        _, images = pipeline.sample(run, Accelerator(), EXPORT_SAMPLES, labels=labels, seed=0, cfg_scale=DEFAULT_CFG)
        save_grid(images, grid, nrow=8)
        console.print(f"the run has no samples: drew {EXPORT_SAMPLES} (seed 0, --cfg {DEFAULT_CFG}) for the card")
        return export_run(location.layout, to, card, args.overwrite, grid=grid)


def cmd_report(args: argparse.Namespace) -> None:
    from vqgen.core.report import write_report

    start = time.perf_counter()
    location = locate_run(args.run)
    out = args.out
    if out is None and location.read_only:  # an exported model is only read: the page goes to outputs/NAME/
        out = location.outputs.report
        out.parent.mkdir(parents=True, exist_ok=True)
    path = write_report(location.layout.root, out)
    make_console().print(f"report of {args.run} in {time.perf_counter() - start:.1f} s -> {path}")
