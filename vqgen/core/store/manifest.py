"""A folder's manifest: every file with its size and sha256, written last, checked before the folder is used.

A training state whose manifest is missing, unreadable or disagrees with a file is damaged; `--resume`
skips it for the newest intact one. An exported model is checked the same way before its weights are read.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

from safetensors import safe_open

from vqgen.core.store.configs import write_json_atomic
from vqgen.core.store.layout import MANIFEST, PROGRESS

MANIFEST_FORMAT = 1


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | Path) -> None:
    """List every file under `folder` (names relative to it) in `folder/manifest.json`."""
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    write_json_atomic({"format": MANIFEST_FORMAT, "files": files}, folder / MANIFEST)


def manifest_damage(folder: str | Path, required: tuple[str, ...] = ()) -> str | None:
    """None when every file `folder/manifest.json` lists (and each `required` name) is there with its size and
    sha256, else what is wrong, naming the file (one line). Files the manifest does not list are not looked at."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing"
    try:
        data = json.loads(manifest.read_text())
        files = data["files"]
        entries = [(str(name), int(e["bytes"]), str(e["sha256"])) for name, e in files.items()]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return f"{manifest} is not a readable manifest"
    for name in required:
        if name not in files:
            return f"{manifest} does not list {name}"
    for name, size, digest in entries:
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, its manifest says {size}"
        if sha256_of(path) != digest:
            return f"{path} does not match its sha256 in the manifest"
    return None


def state_damage(folder: str | Path) -> str | None:
    """None when the state folder is intact, else what is wrong, naming the file (one line)."""
    folder = Path(folder)
    if not (folder / MANIFEST).exists():
        return _damage_without_manifest(folder)
    return manifest_damage(folder, required=(PROGRESS,)) or _progress_damage(folder)


def _progress_damage(folder: Path) -> str | None:
    path = folder / PROGRESS
    try:
        progress = json.loads(path.read_text())
    except (OSError, ValueError):
        return f"{path} is missing or not valid JSON"
    if not isinstance(progress, dict) or not isinstance(progress.get("step"), int):
        return f"{path} has no step count"
    return None


def _damage_without_manifest(folder: Path) -> str | None:
    """States written before vqgen kept manifests have none and still load: checked as far as their formats
    allow (progress.json parses, safetensors headers cover their files, torch files' zip checksums match)."""
    problem = _progress_damage(folder)
    if problem:
        return problem
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), "pt") as f:
                    f.keys()
            except Exception as err:  # SafetensorError, OSError: the header does not describe the file
                return f"{path} is unreadable ({str(err).splitlines()[0][:120]})"
        elif path.suffix in (".bin", ".pkl", ".pt"):  # torch.save writes zip archives with CRCs
            try:
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
            except (OSError, zipfile.BadZipFile, EOFError):
                return f"{path} is truncated or not a torch file"
            if bad is not None:
                return f"{path} fails its checksum ({bad})"
    return None
