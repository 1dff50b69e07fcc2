"""Image references kept on disk: memory-mapped Arrow files, and the cache that converts a source once.

A streamed split never holds its images, encoded or decoded: `ArrowRefs` answers `refs[i]` (bytes, a
file path or a pixel array) from memory-mapped Arrow files and pickles as file names, so DataLoader
workers map the same files instead of receiving copies. Sources that are not Arrow already (a folder
of images, parquet files read through `datasets`) are written once, with a progress bar, into the
cache (`$VQGEN_CACHE`, default `~/.cache/vqgen`), keyed by a fingerprint of what they were made from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from vqgen.core.runtime.errors import VQGenError

CACHE_ENV = "VQGEN_CACHE"
TABLE = "data.arrow"     # in a cache entry: the rows, Arrow IPC stream format (what `datasets` writes)
INFO = "info.json"       # in a cache entry: rows, source, written last: an entry without it is incomplete


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vqgen").expanduser()


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (paths, sizes, mtimes, column names)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def file_stamps(paths: Iterable[str | os.PathLike]) -> list[tuple[str, int, int]]:
    """(resolved path, size, mtime in ns) of each file: changes when a file is replaced or edited."""
    stamps = []
    for p in paths:
        st = os.stat(p)
        stamps.append((str(Path(p).resolve()), st.st_size, st.st_mtime_ns))
    return stamps


def map_table(path: str | os.PathLike) -> pa.Table:
    """A whole Arrow file (IPC stream or file format), memory-mapped: no bytes are read until used."""
    source = pa.memory_map(str(path), "r")
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source).read_all()


def ref_of(value: Any) -> Any:
    """One cell of an image column as a reference `decode` reads: bytes, a path (str) or a pixel array."""
    if isinstance(value, dict):  # datasets.Image storage: {"bytes", "path"}
        return value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if isinstance(value, list):
        return np.asarray(value)
    return value


class ArrowRefs:
    """A split's image references: rows of one column of memory-mapped Arrow files, read on demand."""

    def __init__(self, files: list[str], column: str, rows: np.ndarray | None = None):
        self.files, self.column = [str(f) for f in files], column
        self._column: pa.ChunkedArray | None = None
        self.rows = np.arange(len(self._open())) if rows is None else np.asarray(rows, dtype=np.int64)

    def _open(self) -> pa.ChunkedArray:
        if self._column is None:  # opened lazily: in each DataLoader worker, after unpickling
            self._column = pa.chunked_array(
                [c for f in self.files for c in map_table(f).column(self.column).chunks])
        return self._column

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_column": None}  # file names travel, mapped pages do not

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Any:
        return ref_of(self._open()[int(self.rows[i])].as_py())

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self)))

    def take(self, idx: np.ndarray) -> ArrowRefs:
        out = ArrowRefs.__new__(ArrowRefs)
        out.files, out.column, out._column, out.rows = self.files, self.column, self._column, self.rows[idx]
        return out


def cached_table(key: str, batches: Iterable[pa.RecordBatch] | None, rows: int, what: str, console: Any) -> Path:
    """The cache entry `key`'s Arrow file; written first from `batches` (`rows` rows, a progress bar on
    `console`) when it is not there. Written in a temporary folder and renamed, so an interrupted
    conversion leaves nothing that a later run would take for a finished one."""
    from vqgen.core.runtime.console import make_progress

    entry = cache_root() / key
    if (entry / INFO).is_file():
        return entry / TABLE
    if batches is None:
        raise VQGenError(f"no cached copy of {what} under {entry}")
    tmp = entry.with_name(f".{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        written = 0
        with make_progress(console, f"converting {what} to Arrow") as bar:
            task = bar.add_task("convert", total=rows, metrics="")
            writer = None
            for batch in batches:
                if writer is None:
                    writer = pa.ipc.new_stream(str(tmp / TABLE), batch.schema)
                writer.write_batch(batch)
                written += batch.num_rows
                bar.update(task, completed=written)
            if writer is None:
                raise VQGenError(f"{what} is empty")
            writer.close()
        (tmp / INFO).write_text(json.dumps({"rows": written, "what": what}) + "\n")
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
    except OSError as err:
        raise VQGenError(f"cannot write the Arrow cache {entry}: {err.strerror or err} (set {CACHE_ENV} to "
                         "a folder with room)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        pa.default_memory_pool().release_unused()  # the conversion's buffers: the pool keeps them otherwise
    console.print(f"{what}: converted once to {entry / TABLE} ({written} rows); later runs reuse it")
    return entry / TABLE
