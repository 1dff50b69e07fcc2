"""Weights on disk: safetensors + config.json, written atomically; training-state folders.

Layout of a stage folder (`runs/NAME/vqvae`, `runs/NAME/prior`):

    config.json          the model config (vqgen.core.config format)
    model.safetensors    the weights, with the fingerprint in its metadata
    train_config.json    the training options of the latest run
    state/step-000400/   accelerate save_state output + progress.json, the last --keep of them
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vqgen.core.config import load_config, save_config
from vqgen.core.errors import VQGenError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATE_DIR = "state"
_STEP_DIR = re.compile(r"^step-(\d+)$")

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
    """Write config.json and model.safetensors into `folder`, each atomically. Returns the fingerprint."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: _plain(v) for k, v in model.state_dict().items()}
    fingerprint = state_fingerprint(state)
    fd, tmp = tempfile.mkstemp(prefix=f".{WEIGHTS}.", dir=folder)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"fingerprint": fingerprint, "config_kind": type(config).__name__})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        save_config(config, folder / CONFIG)
        os.replace(tmp, folder / WEIGHTS)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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


def state_dirs(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """Completed state folders under `folder/state`, oldest first (temporary ones are ignored)."""
    root = Path(folder) / STATE_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "progress.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_state_dir(folder: str | os.PathLike) -> Path | None:
    dirs = state_dirs(folder)
    return dirs[-1][1] if dirs else None


def temporary_state_dir(folder: str | os.PathLike, step: int) -> Path:
    """Where a state is written before `commit_state_dir` renames it into place."""
    return Path(folder) / STATE_DIR / f".tmp-step-{step:08d}"


def commit_state_dir(folder: str | os.PathLike, step: int, keep: int) -> Path:
    """Rename a fully written temporary state into place, then prune to the newest `keep`."""
    tmp = temporary_state_dir(folder, step)
    final = Path(folder) / STATE_DIR / f"step-{step:08d}"
    if final.exists():  # the same step saved twice (resume then immediate save): replace it
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for _, path in state_dirs(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    for leftover in (Path(folder) / STATE_DIR).glob(".tmp-step-*"):  # from a crash mid-write
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


def check_stage_dir(folder: str | os.PathLike, what: str, resume: bool, overwrite: bool) -> None:
    """A fresh run never silently replaces trained weights; --resume needs a saved state."""
    folder = Path(folder)
    ensure_writable(folder)
    if resume:
        if latest_state_dir(folder) is None:
            raise VQGenError(f"--resume: no saved training state under {folder / STATE_DIR} "
                             "(train without --resume first)")
    elif (folder / WEIGHTS).exists() and not overwrite:
        raise VQGenError(f"{folder} already holds a trained {what}: pass --resume to continue it "
                         "or --overwrite to start again")


def clear_stage_dir(folder: str | os.PathLike) -> None:
    """--overwrite: remove what an earlier run left (called once everything is validated)."""
    shutil.rmtree(folder, ignore_errors=True)
