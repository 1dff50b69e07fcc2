"""Decisions every process must share: a value the main process chose, an error any process met.

With one process these return their argument and cost nothing; with several they are one collective,
so every process must call them at the same point.
"""

from __future__ import annotations

from typing import Any, TypeVar

from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object, parse_flag_from_env

from vqgen.core.runtime.errors import VQGenError

T = TypeVar("T")


def process_state() -> PartialState:
    """Which process this is, before any Accelerator exists. Set up as `Accelerator()` sets it up
    (ACCELERATE_USE_CPU included): the first one made fixes it for the whole process."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def from_main(state: Any, value: T) -> T:
    """The main process's `value` on every process (`state`: an Accelerator or PartialState)."""
    if state.num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def first_error(state: Any, error: str | None) -> str | None:
    """The first process's error message (by rank) if any process has one, else None, on every process."""
    if state.num_processes == 1:
        return error
    return next((e for e in gather_object([error]) if e), None)


def raise_together(state: Any, error: str | None, main_only: bool = False) -> None:
    """Raise one VQGenError on every process if any (or, `main_only`, the main) process met an error."""
    error = from_main(state, error) if main_only else first_error(state, error)
    if error:
        raise VQGenError(error)
