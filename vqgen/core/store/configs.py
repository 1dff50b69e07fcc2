"""Dataclass configs as versioned JSON: saved beside the weights, validated on load."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store.atomic import temporary_file

FORMAT_VERSION = 9  # 2: TrainConfig.patience, DataConfig.augment/code_copies; 3: scalable trunk, factorised codes,
                    # streaming data, GPU options, report; 4: the trunk's linear path; 5: its patch fold;
                    # 6: clusters within classes; 7: stage 1's sharpness evaluation; 8: the priors' weight
                    # average, code dropout and label smoothing; 9: the class modulation of a Transformer
                    # prior's blocks; older files still load

T = TypeVar("T")


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple[str, ...] | None = None,
           flag: str | None = None, aliases: tuple[str, ...] = (), since: int = 1, legacy: Any = None) -> Any:
    """A config field that carries its own command-line help.

    choices: the allowed values (listed in --help); flag: the option's name when the field's would
    clash with another config's (e.g. "data-seed"); aliases: extra option names ("--lr"); since: the
    format version that added the field; legacy: the value older files without it get, when that is not
    the default (a new default whose weights an older file's model lacks).
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "flag": flag, "aliases": aliases, "since": since, "legacy": legacy})


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as a JSON-ready dict tagged with its kind and format version."""
    return {"kind": type(cfg).__name__, "format_version": FORMAT_VERSION, **dataclasses.asdict(cfg)}


def config_from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Rebuild `cls` from `config_to_dict` output; unknown, missing or foreign fields are refused."""
    if not isinstance(data, dict):
        raise VQGenError(f"{source} holds {type(data).__name__} JSON, expected an object of config fields")
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
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in data and f.metadata.get("legacy") is not None:
            data[f.name] = f.metadata["legacy"]  # a field newer than the file: the behaviour the file was made with
        if f.name in data:
            data[f.name] = checked_value(data[f.name], hints[f.name], f.name, source, f.metadata.get("choices"))
    try:
        return cls(**data)
    except (TypeError, ValueError) as err:  # the dataclass's own range checks
        raise VQGenError(f"{source}: {err}") from None


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _expected(value: Any, tp: Any) -> str | None:
    """None when the JSON `value` fits the type hint `tp`, else what was expected ("an integer")."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        problems = [_expected(value, arm) for arm in args]
        return None if None in problems else " or ".join(problems)
    if tp is type(None):
        return None if value is None else "null"
    if tp is bool:
        return None if isinstance(value, bool) else "true or false"
    if tp is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "a number"
        return None if math.isfinite(value) else "a finite number"
    if tp is str:
        return None if isinstance(value, str) else "a string"
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return "a list"
        if len(args) == 2 and args[1] is Ellipsis:
            pairs = [(item, args[0]) for item in value]
        elif len(value) != len(args):
            return f"a list of {len(args)} items"
        else:
            pairs = list(zip(value, args))
        for item, arm in pairs:
            problem = _expected(item, arm)
            if problem:
                return f"a list whose items are {problem}"
    return None


def _as_tuples(value: Any, tp: Any) -> Any:
    """JSON has no tuples: lists become the tuples the type hint asks for, nested ones too."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        arm = next((a for a in args if _expected(value, a) is None), None)
        return value if arm is None else _as_tuples(value, arm)
    if origin is tuple and isinstance(value, (list, tuple)):
        arms = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        return tuple(_as_tuples(item, arm) for item, arm in zip(value, arms))
    return value


def checked_value(value: Any, tp: Any, name: str, source: str, choices: tuple[str, ...] | None = None) -> Any:
    """`value` as field `name` of type `tp` takes it, or a VQGenError:
    `config.json: K must be an integer, got "512"`."""
    problem = _expected(value, tp)
    if problem:
        raise VQGenError(f"{source}: {name} must be {problem}, got {_shown(value)}")
    if choices and value not in choices:
        raise VQGenError(f"{source}: {name} must be one of {', '.join(choices)}, got {_shown(value)}")
    return _as_tuples(value, tp)


def write_json_atomic(data: Any, path: str | os.PathLike) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temporary_file(path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):  # a full disk, say: one line naming the file
            raise VQGenError(f"cannot write {path}: {err.strerror or err}") from None
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
