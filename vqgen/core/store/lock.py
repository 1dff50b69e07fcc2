"""One writer per stage folder: an advisory lock on `STAGE/.lock`, held while a training or encoding runs.

The lock is `flock` on the file, so the kernel releases it when its holder dies, however it dies; the
file's JSON body (pid, host, start time, what) names the holder to whoever is refused. A body found
on a lock that could be taken was left by a process that died: the lock is taken over, with a word.
Readers (`sample`, `info`, `eval`) never take it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from vqgen.core.runtime.console import make_console
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.runtime.processes import process_state, raise_together
from vqgen.core.store.layout import ModelDir, RunLayout

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class LockOwner:
    pid: int
    host: str
    since: float   # time.time() when it took the lock
    what: str      # "training", "encoding"

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"{self.what} by pid {self.pid} on {self.host} since {started}"


def _read_owner(fd: int) -> LockOwner | None:
    """The owner written in the lock file; None for an empty one."""
    try:
        body = os.pread(fd, 4096, 0)
    except OSError:
        return None
    if not body.strip():
        return None
    try:
        return LockOwner(**json.loads(body))
    except (ValueError, TypeError):
        return LockOwner(pid=0, host="an unknown host", since=0.0, what="an unreadable lock")


class StageLock:
    """`with StageLock(stage.lock, "training") as lock:` holds the lock; `lock.stale` is the dead owner taken over."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path = Path(path)
        self.what = what
        self.stale: LockOwner | None = None
        self._fd: int | None = None
        self._created: list[Path] = []

    def acquire(self) -> LockOwner | None:
        """Take the lock or raise a VQGenError naming its holder; returns the dead owner it took over, if any."""
        folder = self.path.parent
        self._created = [p for p in (folder, *folder.parents) if not p.exists()]
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise VQGenError(f"cannot write to {folder}: {err.strerror or err}") from None
        for _ in range(20):  # the holder may unlink the file between our open and our flock: open again
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                self._remove_created()
                raise VQGenError(f"cannot write to {folder}: {err.strerror or err}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                held = owner.describe() if owner else "another process"
                raise VQGenError(f"{folder} is in use: {held} holds {self.path} (wait for it to end, "
                                 "or stop it)") from None
            except OSError as err:  # e.g. a network file system without locks
                os.close(fd)
                self._remove_created()
                raise VQGenError(f"cannot lock {self.path}: {err.strerror or err}") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise VQGenError(f"cannot lock {self.path}: it keeps being replaced")
        self.stale = _read_owner(fd)
        owner = LockOwner(pid=os.getpid(), host=socket.gethostname(), since=time.time(), what=self.what)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(asdict(owner)).encode(), 0)
            os.fsync(fd)
        except OSError as err:
            os.close(fd)
            raise VQGenError(f"cannot write {self.path}: {err.strerror or err}") from None
        self._fd = fd
        return self.stale

    def release(self) -> None:
        """Remove the file (still holding the lock, so nobody takes a file about to vanish), then let go."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None
            self._remove_created()

    def _remove_created(self) -> None:
        """Folders the lock made for a command that then wrote nothing go again."""
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def __enter__(self) -> StageLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def stage_lock(stage: ModelDir, what: str) -> Iterator[None]:
    """Hold `stage`'s lock for the block. Under Accelerate the main process takes it and every process
    learns whether it could, so all of them start, or all stop with the same line."""
    state = process_state()
    lock = StageLock(stage.lock, what)
    error = None
    if state.is_main_process:
        try:
            lock.acquire()
        except VQGenError as err:
            error = str(err)
    raise_together(state, error, main_only=True)
    if lock.stale is not None:
        make_console().print(f"[bold yellow]warning:[/] took over {stage.lock}: its owner ({lock.stale.describe()}) "
                             "is no longer running")
    try:
        yield
    finally:
        lock.release()


def holds_stage_lock(stage_name: str, what: str = "training") -> Callable[[F], F]:
    """Decorate a function whose first argument is a run directory: it runs holding the lock of that
    run's `stage_name` folder ("vqvae" or "prior"), so a second writer is refused before it writes."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def locked(*args: Any, **kwargs: Any) -> Any:
            run_dir = args[0] if args else kwargs["run_dir"]
            with stage_lock(getattr(RunLayout(run_dir), stage_name), what):
                return fn(*args, **kwargs)
        return locked  # type: ignore[return-value]
    return wrap
