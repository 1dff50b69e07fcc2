"""Everything the user reads goes through rich, and only the main process speaks."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


LOG_WIDTH = 240  # columns of output written to a file or a pipe


def make_console(is_main_process: bool = True) -> Console:
    """A console that prints on the main process and stays silent on the others. Written to a file or a pipe (a
    log), it has no edge to keep to: rich would take 80 columns and cut a wide table's numbers short ("0.48…"),
    so it takes LOG_WIDTH unless COLUMNS says otherwise."""
    console = Console(stderr=False, quiet=not is_main_process, highlight=False, soft_wrap=True)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console.width = LOG_WIDTH
    return console


def make_progress(console: Console, description: str = "") -> Progress:
    """A progress bar with a free-text field for the latest metrics."""
    return Progress(
        TextColumn(f"[bold]{description}" if description else ""),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[metrics]}"),
        console=console,
        disable=console.quiet,
        transient=False,
        refresh_per_second=4 if console.is_terminal else 0.2,
    )


def print_error(message: str, label: str = "error") -> None:
    """One line on stderr, no traceback: how a user's mistake (or a stop on a signal) is reported."""
    line = " ".join(str(message).split())
    colour = "red" if label == "error" else "yellow"
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold {colour}]{label}:[/] {line}", markup=True)
    sys.stderr.flush()

