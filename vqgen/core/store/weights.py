"""Weights on disk: safetensors + config.json, written atomically; a stage's training-state folders.

File names come from `vqgen.core.store.layout`; a model folder holds `config.json` (vqgen.core.store.configs
format) and `model.safetensors` (with the weights' fingerprint in its metadata).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vqgen.core.runtime.errors import VQGenError
from vqgen.core.runtime.signals import signals_deferred
from vqgen.core.store.atomic import ordinary_mode, temporary_file, writing
from vqgen.core.store.configs import load_config, save_config
from vqgen.core.store.layout import CONFIG, LOCK, PROGRESS, WEIGHTS, ModelDir
from vqgen.core.store.manifest import state_damage

T = TypeVar("T")


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy in the default (row-major) layout, whatever the model's memory format."""
    return t.detach().cpu().clone(memory_format=torch.contiguous_format)


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A sha256 over tensor names, shapes, dtypes and bytes: identifies a set of weights."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = _plain(state[name])
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def save_model(model: nn.Module, config: Any, folder: str | os.PathLike) -> str:
    """Write config.json and model.safetensors into `folder`, each atomically. Returns the fingerprint.

    A failed write (a full disk) is one VQGenError naming the file; the previous files stay as they were.
    """
    folder = Path(folder)
    state = {k: _plain(v) for k, v in model.state_dict().items()}
    fingerprint = state_fingerprint(state)
    tmp = None
    with writing(folder / WEIGHTS):
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = temporary_file(folder, prefix=f".{WEIGHTS}.")
        os.close(fd)
    with writing(folder / WEIGHTS, temporary=tmp):
        save_file(state, tmp, metadata={"fingerprint": fingerprint, "config_kind": type(config).__name__})
        os.chmod(tmp, ordinary_mode())  # safetensors writes through a 0600 file of its own
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        save_config(config, folder / CONFIG)
        os.replace(tmp, folder / WEIGHTS)
    return fingerprint


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load safetensors weights; names or shapes that do not match the model are refused, listed."""
    path = Path(path)
    if not path.is_file():
        raise VQGenError(f"weights not found: {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise VQGenError(f"cannot read weights {path}: {err}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{label} {names[:6]}{' ...' if len(names) > 6 else ''}"
                 for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                 if names]
        raise VQGenError(f"weights {path} do not match the config beside them: {'; '.join(parts)}")
    model.load_state_dict(state)


def load_model(cls: type[T], config_cls: type, folder: str | os.PathLike) -> T:
    """Rebuild `cls(config)` from `folder/config.json` and load `folder/model.safetensors` into it."""
    folder = Path(folder)
    config = load_config(config_cls, folder / CONFIG)
    model = cls(config)
    load_weights(model, folder / WEIGHTS)
    return model


def weights_fingerprint(folder: str | os.PathLike) -> str:
    """The fingerprint of the weights in `folder`, recomputed from the tensors."""
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise VQGenError(f"weights not found: {path}")
    return state_fingerprint(load_file(str(path)))


# --- training-state folders ----------------------------------------------------------


def state_dirs(stage: ModelDir) -> list[tuple[int, Path]]:
    """Completed state folders of a stage, oldest first (temporary ones are ignored)."""
    if not stage.states.is_dir():
        return []
    found = []
    for p in stage.states.iterdir():
        step = stage.state_step(p)
        if step is not None and p.is_dir() and (p / PROGRESS).is_file():
            found.append((step, p))
    return sorted(found)


def latest_state_dir(stage: ModelDir) -> Path | None:
    dirs = state_dirs(stage)
    return dirs[-1][1] if dirs else None


def newest_intact_state(stage: ModelDir) -> tuple[Path, list[str]]:
    """The newest state folder whose files match its manifest, and one line for each newer damaged one.

    None intact: a VQGenError listing why each was refused.
    """
    skipped = []
    for _, path in reversed(state_dirs(stage)):
        damage = state_damage(path)
        if damage is None:
            return path, skipped
        skipped.append(f"skipped the damaged training state {path.name}: {damage}")
    if not skipped:
        raise VQGenError(f"nothing to resume: no saved training state under {stage.states} "
                         "(train without --resume first)")
    raise VQGenError(f"no intact training state under {stage.states} to resume from: "
                     + "; ".join(s.split(": ", 1)[1] for s in skipped))


def commit_state_dir(stage: ModelDir, step: int, keep: int) -> Path:
    """Rename a fully written temporary state into place, then prune to the newest `keep`."""
    tmp, final = stage.temporary_state(step), stage.state(step)
    if final.exists():  # the same step saved twice (resume then immediate save): replace it
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        with signals_deferred():
            os.replace(final, old)
            os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for _, path in state_dirs(stage)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    for leftover in stage.states.glob(".tmp-step-*"):  # from a crash mid-write
        if leftover != tmp:
            shutil.rmtree(leftover, ignore_errors=True)
    return final


def ensure_writable(folder: str | os.PathLike) -> None:
    """Fail before any work: create (and remove) a file where `folder` is or will be."""
    folder = Path(folder)
    probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("."))
    try:
        if not probe.is_dir():
            raise NotADirectoryError(20, f"{probe} is not a directory")
        fd, tmp = tempfile.mkstemp(prefix=".vqgen-write-test.", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise VQGenError(f"cannot write to {folder}: {err.strerror or err}") from None


def check_stage_dir(stage: ModelDir, what: str, resume: bool, overwrite: bool) -> None:
    """A fresh run never silently replaces trained weights; resuming needs a saved state."""
    ensure_writable(stage.path)
    if resume:
        if latest_state_dir(stage) is None:
            raise VQGenError(f"nothing to resume: no saved training state under {stage.states} "
                             "(train without --resume first)")
    elif stage.trained and not overwrite:
        raise VQGenError(f"{stage.path} already holds a trained {what}: pass --resume to continue it "
                         "or --overwrite to start again")


def clear_stage_dir(stage: ModelDir) -> None:
    """Overwriting: remove what an earlier run left (called once everything is validated), except the lock
    this run holds."""
    if not stage.path.is_dir():
        return
    for child in stage.path.iterdir():
        if child.name == LOCK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
