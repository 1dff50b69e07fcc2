"""`vqgen export` and `vqgen push`: the trained model as a folder to share, and on the Hugging Face Hub."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from accelerate import Accelerator

from vqgen.commands.common import guidance_flags
from vqgen.core.runtime.console import make_console
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.share import hub
from vqgen.core.share.export import check_export_target, export_run, locate_run
from vqgen.core.share.hub import checked_repo_id
from vqgen.core.share.modelcard import model_card
from vqgen.core.store.imageio import save_grid
from vqgen.core.store.layout import SAMPLE_GRID, RunLayout
from vqgen.core.store.weights import ensure_writable
from vqgen.run import Run

EXPORT_SAMPLES = 64  # drawn for the model card when the run has no sample grid


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
        sampling = run.sampling()  # the prior's defaults, as `vqgen sample` draws
        _, images = run.sample(Accelerator(), EXPORT_SAMPLES, labels, sampling, seed=0)
        save_grid(images, grid, nrow=8)
        console.print(f"the run has no samples: drew {EXPORT_SAMPLES} (seed 0, {guidance_flags(sampling)}) "
                      "for the card")
        return export_run(location.layout, to, card, args.overwrite, grid=grid)
