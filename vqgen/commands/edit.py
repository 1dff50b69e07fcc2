"""`vqgen inpaint` and `vqgen outpaint`: redraw a hole anywhere, or extend images past their borders."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.console import Console
from torch import Tensor

from stage2_prior.config import SamplingConfig
from vqgen.commands.common import at_least, prior_sampling, sampling_options
from vqgen.core.runtime.console import make_console
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store.imageio import save_grid
from vqgen.core.store.weights import ensure_writable
from vqgen.draws import LabelPlan, sample_seeds
from vqgen.edit import (
    blind_kept,
    box_mask,
    check_canvas,
    check_hole,
    code_mask,
    extend,
    fill_canvas,
    load_images,
    load_mask,
    parse_box,
)
from vqgen.run import Run


def _edited(args: argparse.Namespace, run: Run) -> tuple[Tensor, Tensor | None]:
    """The images an edit starts from, (n, c, H, W) uint8, and their labels: --images, or the first --n test
    images (with their own labels unless --label names others)."""
    cfg = run.vqvae.config
    if args.images:
        images, labels = load_images(args.images, cfg.in_channels, cfg.image_height, cfg.image_width), None
    else:
        at_least(args, 1, "n")
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


def _start(args: argparse.Namespace, default_out: str) -> tuple[SamplingConfig, Console, Run, Path]:
    """What both edits start with: the sampling options as given, checked, the run, the output file
    (`default_out`: the run's outputs attribute) writable."""
    given, console = sampling_options(args), make_console()
    run = Run.load(args.run, allow_vqvae_mismatch=args.allow_vqvae_mismatch)
    out = Path(args.out) if args.out else getattr(run.outputs, default_out)
    ensure_writable(out.parent)
    return given, console, run, out


def _sampling(run: Run, given: SamplingConfig, console: Console) -> SamplingConfig:
    """The edit's sampling options with the prior's guidance filled in and checked against the run. Called
    after the edit's own options are checked, so that a mistake in them is the one line said, with no note on
    guidance before it."""
    [sampling] = prior_sampling(run, [given], console)
    run.check_sampling(1, LabelPlan(), sampling)
    return sampling


def cmd_inpaint(args: argparse.Namespace) -> None:
    given, console, run, out = _start(args, "inpainted")
    cfg = run.vqvae.config
    pixels = (box_mask(parse_box(args.box), cfg.image_height, cfg.image_width) if args.box
              else load_mask(args.mask, cfg.image_height, cfg.image_width))
    drawn = code_mask(pixels, cfg.downsample)
    check_hole(drawn)
    sampling = _sampling(run, given, console)
    images, labels = _edited(args, run)
    codes = run.encode(images)
    keep = (~drawn).expand(codes.shape).clone()
    _say_raster(run, keep[0], console)
    filled = run.fill(len(codes), labels, sample_seeds(args.seed, torch.arange(len(codes))), sampling, codes, keep)
    holed = images.clone()
    holed[:, :, pixels] = 128  # the pixels the hole covers, in grey
    save_grid(torch.cat([images, holed, run.decode(filled)]), out, nrow=len(images))
    console.print(f"{len(images)} images, {int(drawn.sum())} of {drawn.numel()} codes redrawn (rows: originals, "
                  f"the hole, inpainted) -> {out}")


def cmd_outpaint(args: argparse.Namespace) -> None:
    given, console, run, out = _start(args, "outpainted")
    sides = [getattr(args, side) for side in ("top", "bottom", "left", "right")]
    height, width = _outpaint_size(args, sides, run.vqvae.config.grid_shape)
    sampling = _sampling(run, given, console)
    if args.canvas:
        labels = run.label_plan(args.label, args.n, seed=args.seed).of(torch.arange(args.n))
        canvas = torch.zeros(args.n, height, width, dtype=torch.long)
        keep = torch.zeros(height, width, dtype=torch.bool)
        rows = []
    else:
        images, labels = _edited(args, run)
        codes = run.encode(images)
        canvas, keep = extend(codes, *sides)
        _say_raster(run, keep, console)
        rows = [run.decode(torch.where(keep, canvas, 0))]  # the originals on the canvas (the rest: code 0)
    filled = fill_canvas(run, canvas, keep, labels, args.seed, sampling)
    save_grid(torch.cat([*rows, run.decode(filled)]), out, nrow=len(filled))
    console.print(f"{len(filled)} canvases of {filled.shape[2]}x{filled.shape[1]} codes "
                  f"({'drawn from nothing' if args.canvas else 'rows: originals, outpainted'}) -> {out}")


def _outpaint_size(args: argparse.Namespace, sides: list[int], grid: tuple[int, int]) -> tuple[int, int]:
    """The outpainted canvas's (height, width) in codes, every option of it checked: --canvas W,H drawn from
    nothing, or the trained grid extended by `sides` (top, bottom, left, right)."""
    if any(k < 0 for k in sides):
        raise VQGenError(f"--top/--bottom/--left/--right must be >= 0, got {','.join(map(str, sides))}")
    if args.canvas:
        if any(sides) or args.images:
            raise VQGenError("--canvas draws from nothing: give it without --images or --top/--bottom/--left/--right")
        width, height = _canvas(args.canvas)
        at_least(args, 1, "n")
    elif not any(sides):
        raise VQGenError("nothing to outpaint: give --top, --bottom, --left or --right (code rows/columns), "
                         "or --canvas W,H")
    else:
        height, width = grid[0] + sides[0] + sides[1], grid[1] + sides[2] + sides[3]
    check_canvas(height, width, grid)
    return height, width


def _canvas(text: str) -> tuple[int, int]:
    """--canvas "W,H" -> (W, H)."""
    try:
        width, height = (int(part) for part in text.split(","))
    except ValueError:
        raise VQGenError(f"--canvas must be W,H in codes, got {text!r}") from None
    return width, height
