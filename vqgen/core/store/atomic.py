"""A failed write as one line, the path and the operating system's reason, with its temporary files removed.

`cannot write runs/x/prior/state/.tmp-step-00000400: No space left on device`
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from vqgen.core.runtime.errors import VQGenError, one_line

# torch.save reports a failed write as a RuntimeError from its zip writer, safetensors as its own error
_LIBRARY_WRITE_FAILURE = re.compile(r"PytorchStreamWriter|inline_container|file write failed|I/O error|os error \d+")
NEARLY_FULL = 1 << 20  # bytes free below which a library's vague write failure is taken for a full disk


def ordinary_mode(folder: bool = False) -> int:
    """The permissions of an ordinary new file (0666) or folder (0777), less the umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def temporary_file(folder: str | os.PathLike, prefix: str, suffix: str = "") -> tuple[int, str]:
    """`tempfile.mkstemp` with the permissions of an ordinary new file, not 0600: the file is renamed
    into place, and a run's files are often read by other users or a web server."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    os.fchmod(fd, ordinary_mode())
    return fd, tmp


def is_write_error(err: BaseException) -> bool:
    """An OSError, or a library's report of a failed write (not a bug of ours that happens to raise)."""
    return isinstance(err, OSError) or (
        type(err).__name__ in ("RuntimeError", "SafetensorError") and bool(_LIBRARY_WRITE_FAILURE.search(str(err))))


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def reason(err: BaseException, path: str | os.PathLike) -> str:
    """The operating system's words for why writing `path` failed."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    code = re.search(r"os error (\d+)", str(err))  # safetensors: "... No space left on device (os error 28)"
    if code:
        return os.strerror(int(code.group(1)))
    free = _free_bytes(Path(path))
    if free is not None and free < NEARLY_FULL:  # torch.save on a full disk says "unexpected pos 576 vs 534"
        return os.strerror(errno.ENOSPC)
    return one_line(err)


def write_error(path: str | os.PathLike, err: BaseException) -> VQGenError:
    return VQGenError(f"cannot write {path}: {reason(err, path)}")


def remove(path: str | os.PathLike | None) -> None:
    """Remove a temporary file or folder if it is there."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def writing(path: str | os.PathLike, temporary: str | os.PathLike | None = None) -> Iterator[None]:
    """Any failure in the block removes `temporary`; a failed write becomes one VQGenError naming `path`."""
    try:
        yield
    except BaseException as err:
        error = write_error(path, err) if is_write_error(err) else None  # before removing: the disk is still full
        remove(temporary)
        if error is not None:
            raise error from None
        raise
