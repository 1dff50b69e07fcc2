"""Defaults sized to the data: a training length, evaluation cadence and batch from the number of items;
the model options a fresh run gets; said in one line at start.
"""

from __future__ import annotations

from typing import Any

from vqgen.core.runtime.console import make_console
from vqgen.core.runtime.processes import process_state


def sized_schedule(given: dict[str, Any], steps: int, evaluations: int) -> dict[str, int]:
    """The training length the data calls for, `steps`, with `evaluations` evaluations (and saves) over
    the run. Options the user gave win."""
    chosen = given.get("max_steps", steps)
    every = max(50, round((chosen or steps) / evaluations / 50) * 50)
    return {"max_steps": chosen, "eval_every": every, "save_every": every}


def sized_batch(given: dict[str, Any], default: int, items: int) -> dict[str, int]:
    """The default batch size, or all `items` where there are fewer, so that a tiny folder trains as it is.
    A batch size the user gave wins (and is refused later if it is too large)."""
    return {"batch_size": items} if "batch_size" not in given and 0 < items < default else {}


def steps_for_passes(items: int, batch_size: int, passes: float, lowest: int, highest: int) -> int:
    """`passes` passes over `items` at `batch_size`, in hundreds of steps, kept within [lowest, highest]."""
    return min(highest, max(lowest, int(round(passes * items / batch_size, -2))))


def report_sized(sized_model: dict[str, Any], sized_training: dict[str, Any], given: dict[str, Any],
                 resume: bool, why: dict[str, str] | None = None) -> None:
    """Say, in one line at start, which defaults the rule sized to the data (those not given), each with the
    reason `why` gives for it. A resumed run keeps what it was started with: nothing is sized."""
    if resume:
        return
    chosen = {k: v for k, v in {**sized_model, **sized_training}.items() if k not in given}
    said = [f"{k} {v}" + (f" ({why[k]})" if why and k in why else "") for k, v in chosen.items()]
    make_console(process_state().is_main_process).print(
        "defaults sized to the data: " + (", ".join(said) or "none (all given)"))
