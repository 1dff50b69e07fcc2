"""Dataclass configs as versioned JSON: saved beside the weights, validated on load."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, TypeVar

from vqgen.core.errors import VQGenError

FORMAT_VERSION = 2  # 2: TrainConfig.patience, DataConfig.augment/code_copies; files of version 1 still load

T = TypeVar("T")


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple[str, ...] | None = None,
           flag: str | None = None, aliases: tuple[str, ...] = (), since: int = 1) -> Any:
    """A config field that carries its own command-line help.

    choices: the allowed values (listed in --help); flag: the option's name when the field's would
    clash with another config's (e.g. "data-seed"); aliases: extra option names ("--lr"); since: the
    format version that added the field (older files without it get the default).
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "flag": flag, "aliases": aliases, "since": since})


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as a JSON-ready dict tagged with its kind and format version."""
    return {"kind": type(cfg).__name__, "format_version": FORMAT_VERSION, **dataclasses.asdict(cfg)}


def config_from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Rebuild `cls` from `config_to_dict` output; unknown, missing or foreign fields are refused."""
    data = dict(data)
    kind = data.pop("kind", None)
    version = data.pop("format_version", None)
    if kind != cls.__name__:
        raise VQGenError(f"{source} holds a {kind!r} config, expected {cls.__name__!r}")
    if version not in range(1, FORMAT_VERSION + 1):
        raise VQGenError(f"{source} has format_version {version!r}, this vqgen reads versions 1 to {FORMAT_VERSION}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    # a field added in a later format version may be absent from an older file: it takes its default
    missing = sorted(f.name for f in dataclasses.fields(cls)
                     if f.name not in data and not f.metadata.get("since", 1) > version)
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown fields {unknown}")
        if missing:
            parts.append(f"missing fields {missing}")
        raise VQGenError(f"{source} does not match {cls.__name__}: {', '.join(parts)}")
    for f in dataclasses.fields(cls):  # JSON has no tuples
        if isinstance(data.get(f.name), list) and isinstance(f.default, tuple):
            data[f.name] = tuple(data[f.name])
    try:
        return cls(**data)
    except TypeError as err:
        raise VQGenError(f"{source}: {err}") from None


def write_json_atomic(data: Any, path: str | os.PathLike) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise VQGenError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise VQGenError(f"{what} {path} is not valid JSON ({err.msg} at line {err.lineno})") from None


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    write_json_atomic(config_to_dict(cfg), path)


def load_config(cls: type[T], path: str | os.PathLike) -> T:
    return config_from_dict(cls, read_json(path, "config"), source=str(path))


def resumed_config(cls: type[T], path: str | os.PathLike, given: dict[str, Any], strict: bool, what: str) -> T:
    """On --resume: the config saved at `path`, with the options given now.

    strict: any given option that differs from the saved value is refused, listing each.
    """
    saved = load_config(cls, path)
    if strict:
        conflicts = [f"{k}={v!r} (run has {getattr(saved, k)!r})" for k, v in given.items() if getattr(saved, k) != v]
        if conflicts:
            raise VQGenError(f"cannot resume with different {what} than {path}: {', '.join(conflicts)}")
    return dataclasses.replace(saved, **given)
