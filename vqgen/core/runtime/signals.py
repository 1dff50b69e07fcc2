"""Stopping on a signal without damage.

Training: the first SIGTERM or SIGINT asks the loop to stop after the current optimizer step (it then
saves a resumable state and exits non-zero); a second one exits at once, leaving only temporary
folders behind. Commands: SIGTERM is turned into an interrupt, so that they clean up as on Ctrl-C.
A few renames that must happen together hold both signals back until they are done.

A signal the process was started with ignored (SIGINT, for a job started in the background with `&` or
`nohup`) stays ignored: none of these handlers replaces SIG_IGN, so such a job stops on SIGTERM only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Iterator

import torch

from vqgen.core.runtime.errors import Terminated

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Under several processes every one must stop at the same step, which takes a collective: it runs at
# every STOP_CHECK_EVERY-th step and at the logging, evaluation and save steps (which synchronise
# anyway), never at the others. torchrun waits 30 s after forwarding a signal before it kills.
STOP_CHECK_EVERY = 10


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _handled() -> tuple[signal.Signals, ...]:
    """The stop signals this process listens to: those it was not told to ignore."""
    return tuple(s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN)


def _say(message: str) -> None:
    """Write to stderr from a signal handler: one system call, no locks that the interrupted code may hold."""
    try:
        os.write(2, message.encode())
    except OSError:
        pass


class StopSignals:
    """While entered, the first SIGTERM/SIGINT sets `signum` for the loop to act on; a second one exits
    at once with 128 + its number (only temporary files can be left: every write goes through a rename)."""

    def __init__(self, announce: bool = True):
        self.signum = 0
        self.announce = announce  # only the main process speaks
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if _main_thread():
            for s in _handled():
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signum:
            if self.announce:
                _say(f"\n{name} again: exiting at once; the last complete state is kept\n")
            os._exit(128 + signum)
        self.signum = signum
        if self.announce:
            _say(f"\n{name}: stopping after this step and saving a resumable state (send it again to exit at once)\n")

    def agreed(self, accelerator: Any, step: int, synced: bool) -> int:
        """The signal every process stops for after `step`, or 0. One process: the flag, no device sync.
        Several: the largest flag of all, read at steps that sync anyway and every STOP_CHECK_EVERY-th."""
        if accelerator.num_processes == 1:
            return self.signum
        if not (synced or step % STOP_CHECK_EVERY == 0):
            return 0
        flag = torch.tensor(self.signum, dtype=torch.long, device=accelerator.device)
        return int(accelerator.reduce(flag, "max"))


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block is done, then deliver them: for renames that must
    happen together (a signal between them would leave neither the old folder nor the new one)."""
    if not _main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in _handled()}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in pending:
            signal.raise_signal(s)


@contextlib.contextmanager
def terminate_interrupts() -> Iterator[None]:
    """SIGTERM raises `Terminated` (a KeyboardInterrupt) in the block: temporary files are removed as on Ctrl-C."""
    if not _main_thread() or signal.SIGTERM not in _handled():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
