"""The work behind each `vqgen` command: check the options, load the run, call its methods, write the files.

`vqgen.cli` parses the arguments and imports this module only then, so `vqgen --help` never
imports torch. Each command checks what it was given before it loads or writes anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import Tensor
from rich.table import Table

from stage1_vqvae.config import GANConfig, VQVAEConfig
from stage1_vqvae.encode import encode_splits
from stage1_vqvae.train import train_vqvae
from stage2_prior.config import DEFAULT_CFG, SamplingConfig
from stage2_prior.train import train_prior
from vqgen.arguments import VQVAE_FROM_DATA, flag, given_options, given_prior_options
from vqgen.core.data.config import DataConfig
from vqgen.core.evaluate.measures import psnr
from vqgen.core.runtime.console import make_console, make_progress
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.runtime.processes import from_main
from vqgen.core.runtime.signals import terminate_interrupts
from vqgen.core.share import hub
from vqgen.core.share.export import check_export_target, export_run, locate_run
from vqgen.core.share.hub import checked_repo_id
from vqgen.core.share.modelcard import model_card
from vqgen.core.store.codes import CodeSplit, load_codes
from vqgen.core.store.configs import load_config, read_json
from vqgen.core.store.imageio import png_size, save_grid
from vqgen.core.store.jsonl import JsonlLog
from vqgen.core.store.layout import SAMPLE_GRID, RunLayout
from vqgen.core.store.lock import stage_lock
from vqgen.core.store.sample_set import sample_set
from vqgen.core.store.weights import ensure_writable
from vqgen.core.training.config import TrainConfig
from vqgen.edit import (blind_kept, box_mask, check_canvas, check_hole, code_mask, extend, fill_canvas,
                        load_images, load_mask, parse_box)
from vqgen.run import LabelPlan, Run, sample_seeds

EXPORT_SAMPLES = 64  # drawn for the model card when the run has no sample grid


def _at_least(args: argparse.Namespace, lowest: int, *names: str) -> None:
    """Refuse an integer option below `lowest`, naming its flag: `--n must be >= 1, got 0`."""
    for name in names:
        if getattr(args, name) < lowest:
            raise VQGenError(f"--{name.replace('_', '-')} must be >= {lowest}, got {getattr(args, name)}")


def _sampling(args: argparse.Namespace) -> SamplingConfig:
    """The sampling options of the parsed command line, checked."""
    return SamplingConfig(**given_options(args, SamplingConfig))


def _as_flags(config) -> dict:
    """A config's values under the names of their command-line options (`cfg_scale` as `cfg`)."""
    return {flag(f).replace("-", "_"): getattr(config, f.name) for f in dataclasses.fields(config)}


def cmd_train(args: argparse.Namespace) -> None:
    """`vqgen train vqvae|prior`: the stage's one entry point with the options given on the command line."""
    if args.stage == "vqvae":
        train_vqvae(args.run, given_options(args, DataConfig), given_options(args, TrainConfig),
                    given_options(args, VQVAEConfig, skip=VQVAE_FROM_DATA), gan=given_options(args, GANConfig),
                    preset=args.preset,
                    resume=args.resume, encode=not args.no_encode, overwrite=args.overwrite)
    else:
        train_prior(args.run, args.prior, given_options(args, TrainConfig), given_prior_options(args),
                    codes_dir=args.codes, labels=args.labels, resume=args.resume,
                    allow_vqvae_mismatch=args.allow_vqvae_mismatch, overwrite=args.overwrite)


def cmd_sample(args: argparse.Namespace) -> None:
    _at_least(args, 1, "n", "batch_size", "nrow")
    sampling = _sampling(args)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    console = make_console(accelerator.is_main_process)
    run = Run.load(args.run, allow_vqvae_mismatch=args.allow_vqvae_mismatch, device=accelerator.device)
    labels = run.label_plan(args.label, args.n, args.unconditional, seed=args.seed)
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
        samples.settings = {**vars(args), **_as_flags(sampling), "processes": accelerator.num_processes,
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
    _at_least(args, 1, "n")
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
    _at_least(args, 1, "batch_size")
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
    _at_least(args, 1, "n")
    sampling = _sampling(args)
    console = make_console()
    run = Run.load(args.run, allow_vqvae_mismatch=args.allow_vqvae_mismatch)
    out = Path(args.out) if args.out else run.outputs.completions
    ensure_writable(out.parent)
    if args.keep_rows is not None and not 0 <= args.keep_rows <= run.prior.config.grid_height:
        raise VQGenError(f"--keep-rows must be in [0, {run.prior.config.grid_height}], got {args.keep_rows}")
    if run.read_only:  # an exported model carries no code grids: encode the test images
        data = run.data()
        _, _, grids = run.reconstruct(data.test.take(range(min(args.n, len(data.test)))))
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


def _edited(args: argparse.Namespace, run: Run) -> tuple[Tensor, Tensor | None]:
    """The images an edit starts from, (n, c, H, W) uint8, and their labels: --images, or the first --n test
    images (with their own labels unless --label names others)."""
    cfg = run.vqvae.config
    if args.images:
        images, labels = load_images(args.images, cfg.in_channels, cfg.image_height, cfg.image_width), None
    else:
        _at_least(args, 1, "n")
        test = run.data().test
        images = test.take(range(min(args.n, len(test))))
        labels = test.labels[: len(images)] if test.labels is not None and not run.source.pseudo_labels else None
    if args.label or not run.prior.config.num_classes:
        labels = run.label_plan(args.label, len(images)).of(torch.arange(len(images)))
    elif labels is None:  # a conditional prior, images without labels: every class in turn
        labels = run.label_plan(None, len(images), seed=args.seed).of(torch.arange(len(images)))
    return images, labels


def _say_raster(run: Run, keep: Tensor, console) -> None:
    """One line when a raster prior cannot see some kept codes (those after the first drawn one)."""
    blind = blind_kept(keep)
    if blind and run.kind.raster:
        console.print(f"[bold yellow]note:[/] a {run.kind.name} prior draws in raster order: the {blind} kept codes "
                      "after the first redrawn one are kept but do not condition it (a masked prior, "
                      "`vqgen train prior --prior masked`, sees them all)")


def cmd_inpaint(args: argparse.Namespace) -> None:
    sampling = _sampling(args)
    console = make_console()
    run = Run.load(args.run, allow_vqvae_mismatch=args.allow_vqvae_mismatch)
    out = Path(args.out) if args.out else run.outputs.inpainted
    ensure_writable(out.parent)
    cfg = run.vqvae.config
    pixels = (box_mask(parse_box(args.box), cfg.image_height, cfg.image_width) if args.box
              else load_mask(args.mask, cfg.image_height, cfg.image_width))
    drawn = code_mask(pixels, cfg.downsample)
    check_hole(drawn)
    run.check_sampling(1, LabelPlan(), sampling)
    images, labels = _edited(args, run)
    _, _, codes = run.reconstruct(images)
    keep = (~drawn).expand(codes.shape).clone()
    _say_raster(run, keep[0], console)
    filled = run.fill(len(codes), labels, sample_seeds(args.seed, torch.arange(len(codes))), sampling, codes, keep)
    holed = images.clone()
    holed[:, :, pixels] = 128  # the pixels the hole covers, in grey
    save_grid(torch.cat([images, holed, run.decode(filled)]), out, nrow=len(images))
    console.print(f"{len(images)} images, {int(drawn.sum())} of {drawn.numel()} codes redrawn (rows: originals, "
                  f"the hole, inpainted) -> {out}")


def cmd_outpaint(args: argparse.Namespace) -> None:
    sampling = _sampling(args)
    console = make_console()
    run = Run.load(args.run, allow_vqvae_mismatch=args.allow_vqvae_mismatch)
    out = Path(args.out) if args.out else run.outputs.outpainted
    ensure_writable(out.parent)
    grid = run.vqvae.config.grid_shape
    sides = [getattr(args, side) for side in ("top", "bottom", "left", "right")]
    if any(k < 0 for k in sides):
        raise VQGenError(f"--top/--bottom/--left/--right must be >= 0, got {','.join(map(str, sides))}")
    run.check_sampling(1, LabelPlan(), sampling)
    if args.canvas:
        if any(sides) or args.images:
            raise VQGenError("--canvas draws from nothing: give it without --images or --top/--bottom/--left/--right")
        width, height = _canvas(args.canvas)
        check_canvas(height, width, grid)
        _at_least(args, 1, "n")
        labels = run.label_plan(args.label, args.n, seed=args.seed).of(torch.arange(args.n))
        canvas = torch.zeros(args.n, height, width, dtype=torch.long)
        keep = torch.zeros(height, width, dtype=torch.bool)
        rows = []
    else:
        if not any(sides):
            raise VQGenError("nothing to outpaint: give --top, --bottom, --left or --right (code rows/columns), "
                             "or --canvas W,H")
        check_canvas(grid[0] + sides[0] + sides[1], grid[1] + sides[2] + sides[3], grid)
        images, labels = _edited(args, run)
        _, _, codes = run.reconstruct(images)
        canvas, keep = extend(codes, *sides)
        _say_raster(run, keep, console)
        rows = [run.decode(torch.where(keep, canvas, 0))]  # the originals on the canvas (the rest: code 0)
    filled = fill_canvas(run, canvas, keep, labels, args.seed, sampling)
    save_grid(torch.cat([*rows, run.decode(filled)]), out, nrow=len(filled))
    console.print(f"{len(filled)} canvases of {filled.shape[2]}x{filled.shape[1]} codes "
                  f"({'drawn from nothing' if args.canvas else 'rows: originals, outpainted'}) -> {out}")


def _canvas(text: str) -> tuple[int, int]:
    """--canvas "W,H" -> (W, H)."""
    try:
        width, height = (int(part) for part in text.split(","))
    except ValueError:
        raise VQGenError(f"--canvas must be W,H in codes, got {text!r}") from None
    return width, height


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
    _at_least(args, 1, "judge_steps", "batch_size")
    if args.inception and not args.samples:
        raise VQGenError("--inception scores samples: give --samples N as well")
    sampling = _sampling(args)
    console = make_console()
    accelerator = Accelerator()
    run = Run.load(args.run, need_prior=bool(args.samples), allow_vqvae_mismatch=args.allow_vqvae_mismatch,
                   device=accelerator.device)
    data = run.data()
    metrics = run.evaluate(data)
    table = Table(title=f"test metrics of {run.path}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.5g}")
    console.print(table)
    if not args.samples:
        return
    scores = run.sample_quality(accelerator, args.samples, data, sampling, seed=args.seed, batch_size=args.batch_size,
                                retrain_judge=args.retrain_judge, inception=args.inception,
                                judge_steps=args.judge_steps,
                                closest_pairs=run.outputs.closest_pairs)
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
    record = {"time": time.time(), "samples": args.samples, **dataclasses.asdict(sampling), "seed": args.seed,
              **scores}
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
    run = Run.load(location)  # located once: a Hub model is not downloaded twice
    name = to.resolve().name

    def card(layout: RunLayout, names: list[str]) -> str:
        return model_card(layout, names, repo=str(repo) if repo else None, name=name, grid=SAMPLE_GRID in names)

    if location.layout.newest_sample_grid() is not None:
        return export_run(location.layout, to, card, args.overwrite)
    with tempfile.TemporaryDirectory(prefix="vqgen-export-") as tmp:
        grid = Path(tmp) / SAMPLE_GRID
        labels = run.label_plan(None, EXPORT_SAMPLES)
        _, images = run.sample(Accelerator(), EXPORT_SAMPLES, labels, SamplingConfig(), seed=0)
        save_grid(images, grid, nrow=8)
        console.print(f"the run has no samples: drew {EXPORT_SAMPLES} (seed 0, --cfg {DEFAULT_CFG}) for the card")
        return export_run(location.layout, to, card, args.overwrite, grid=grid)


def cmd_report(args: argparse.Namespace) -> None:
    from vqgen.core.report.page import write_report

    start = time.perf_counter()
    location = locate_run(args.run)
    out = args.out
    if out is None and location.read_only:  # an exported model is only read: the page goes to outputs/NAME/
        out = location.outputs.report
        out.parent.mkdir(parents=True, exist_ok=True)
    path = write_report(location.layout.root, out)
    make_console().print(f"report of {args.run} in {time.perf_counter() - start:.1f} s -> {path}")
