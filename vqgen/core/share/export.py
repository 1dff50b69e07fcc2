"""Exported models: write one from a run (`vqgen export`), check one, and find what `--run` names.

An exported folder keeps the run's names for what it carries (both stages' config.json, model.safetensors and
records, codes/meta.json without the grids) and adds README.md (the model card), samples.png and manifest.json,
so the loader reads a run and an exported model alike. It is what a Hugging Face Hub repo of the model holds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vqgen.core.runtime.errors import VQGenError
from vqgen.core.runtime.signals import signals_deferred
from vqgen.core.share import hub
from vqgen.core.share.modelcard import LIBRARY
from vqgen.core.store.atomic import ordinary_mode, remove, writing
from vqgen.core.store.layout import MANIFEST, MODEL_CARD, SAMPLE_GRID, RunLayout, model_outputs
from vqgen.core.store.manifest import manifest_damage, write_manifest


@dataclass(frozen=True)
class RunLocation:
    """What `--run` names: where a command reads the model and where it writes what it makes. A run directory
    is both; an exported folder or a Hub download is only read, and commands write under outputs/NAME/."""

    layout: RunLayout
    outputs: RunLayout
    origin: str          # as the user gave it: a path, or owner/name[@revision]

    @property
    def read_only(self) -> bool:
        return self.outputs != self.layout


def locate_run(run: str | os.PathLike | RunLocation) -> RunLocation:
    """An existing local path is local (an exported one is checked against its manifest); otherwise a string
    that parses as a Hub repo id is downloaded into the Hub's cache; anything else is returned as a (missing)
    run directory, for the command to refuse by name. `runs/NAME` is never a repo id."""
    if isinstance(run, RunLocation):
        return run
    path = Path(run).expanduser()
    if path.exists():
        layout = RunLayout(path)
        if not is_exported(layout):
            return RunLocation(layout, layout, str(run))
        check_exported(layout)
        return RunLocation(layout, model_outputs(path.resolve().name), str(run))
    repo = hub.parse_repo_id(run) if isinstance(run, str) else None
    if repo is None or repo.owner == "runs" or Path(repo.owner).expanduser().exists():
        return RunLocation(RunLayout(path), RunLayout(path), str(run))
    # the manifest first: a repo that is no vqgen model costs one small file, and only what it lists follows
    layout = RunLayout(hub.download(repo, [MANIFEST]))
    if not layout.manifest.is_file():
        raise VQGenError(f"Hugging Face Hub repo {str(repo)!r} is not a vqgen model: it has no {MANIFEST} "
                         f"(publish one with `vqgen push`)")
    layout = RunLayout(hub.download(repo, [MANIFEST, *_listed(layout.manifest)]))
    check_exported(layout, str(repo))
    return RunLocation(layout, model_outputs(repo.local_name), str(repo))


def _listed(manifest: Path) -> list[str]:
    """The names a manifest lists (none if it cannot be read: the check that follows says why)."""
    try:
        return [str(name) for name in json.loads(manifest.read_text())["files"]]
    except (OSError, ValueError, TypeError, KeyError):
        return []


def is_exported(layout: RunLayout) -> bool:
    """Written by `vqgen export`: a manifest at the root, or a model card whose front matter names vqgen (so that
    removing the manifest does not pass a tampered export off as a run directory; a run's own README does not)."""
    if layout.manifest.is_file():
        return True
    try:
        card = layout.model_card.read_text(errors="replace")[:4096]
    except OSError:
        return False
    return card.startswith("---") and f"library_name: {LIBRARY}" in card.split("---")[1]


def check_exported(layout: RunLayout, name: str | None = None) -> None:
    """Every file the manifest lists is there with its size and sha256, and it lists the VQ-VAE: else one
    VQGenError naming the file. Runs before any weight is read."""
    required = tuple(p.relative_to(layout.root).as_posix() for p in (layout.vqvae.config, layout.vqvae.weights))
    damage = manifest_damage(layout.root, required)
    if damage:
        raise VQGenError(f"exported model {name or layout.root} is damaged or incomplete: {damage}")


def check_export_target(run: RunLayout, to: Path, overwrite: bool) -> None:
    """Refuse, before anything is written, a `--to` that would hide, replace or sit inside the run, a file, a
    non-empty folder without --overwrite, or a non-empty folder that is not an exported model."""
    if not run.root.is_dir():
        raise VQGenError(f"run not found: {run.root}")
    source, target = run.root.resolve(), to.expanduser().resolve()
    if target == source or source in target.parents or target in source.parents:
        raise VQGenError(f"--to {to} overlaps the run {run.root}: export to a folder outside it")
    if to.exists() and not to.is_dir():
        raise VQGenError(f"--to {to} is a file, not a folder")
    if to.is_dir() and any(to.iterdir()):
        if not overwrite:
            raise VQGenError(f"--to {to} exists and is not empty: pass --overwrite to replace the model in it, "
                             "or choose another folder")
        if not is_exported(RunLayout(to)):
            raise VQGenError(f"--to {to} holds files that are not an exported vqgen model: --overwrite replaces "
                             "only an exported model; choose another folder")
    for name, path in (("VQ-VAE", run.vqvae.weights), ("prior", run.prior.weights), ("prior", run.prior.config),
                       ("VQ-VAE", run.vqvae.config), ("prior", run.prior.source)):
        if not path.is_file():
            raise VQGenError(f"cannot export {run.root}: it has no trained {name} ({path} is missing)")


def export_files(run: RunLayout, grid: Path | None = None) -> list[tuple[Path, str]]:
    """(file in the run, name in the exported folder) for everything an export carries from `run`; the picture is
    `grid`, else the run's newest sample grid."""
    found = [(p, p.relative_to(run.root).as_posix()) for p in run.exported_files() if p.is_file()]
    grid = grid or run.newest_sample_grid()
    return found + ([(grid, SAMPLE_GRID)] if grid else [])


def export_run(run: RunLayout, to: Path, card: Callable[[RunLayout, list[str]], str], overwrite: bool = False,
               grid: Path | None = None) -> list[str]:
    """Copy the model of `run` (and `grid`, else its newest sample grid) into `to` with its card
    (`card(run, names)` -> README.md text) and a manifest -> the names written. Written into a temporary folder
    beside `to` and renamed into place: a failure leaves `to` as it was, and nothing else is written."""
    check_export_target(run, to, overwrite)
    files = export_files(run, grid)
    names = [name for _, name in files] + [MODEL_CARD, MANIFEST]
    text = card(run, names)
    tmp = None
    with writing(to):
        to.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{to.name}.", suffix=".partial", dir=to.parent))
        tmp.chmod(ordinary_mode(folder=True))  # mkdtemp's 0700 would stay with the renamed folder
    with writing(to, temporary=tmp):
        for path, name in files:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, tmp / name)
        _drop_local_paths(run, RunLayout(tmp))
        (tmp / MODEL_CARD).write_text(text)
        write_manifest(tmp)
        _swap_into_place(tmp, to)
    return names


def _drop_local_paths(run: RunLayout, exported: RunLayout) -> None:
    """The records name the folders they came from (`vqvae_dir` of the codes, `codes_dir` of the prior): in an
    export, which may be published, they name the folders inside it instead of the author's file system."""
    for path, field, inside in ((exported.codes_meta, "vqvae_dir", exported.vqvae.path),
                                (exported.prior.source, "codes_dir", exported.codes)):
        if path.is_file():
            data = json.loads(path.read_text())
            if field in data:
                data[field] = inside.relative_to(exported.root).as_posix()
                path.write_text(json.dumps(data, indent=2) + "\n")


def _swap_into_place(tmp: Path, to: Path) -> None:
    """Rename `tmp` to `to`; an exported model already there (--overwrite, checked) goes only once the new is in."""
    old = None
    with signals_deferred():
        if to.is_dir() and any(to.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{to.name}.", suffix=".old", dir=to.parent))
            os.replace(to, old / to.name)
        elif to.is_dir():
            to.rmdir()
        os.replace(tmp, to)
    remove(old)

