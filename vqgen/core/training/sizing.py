"""Defaults sized to the data: a training length, evaluation cadence and batch from the number of items;
the model options a fresh run gets; said in one line at start.
"""

from __future__ import annotations

import math
from typing import Any

from vqgen.core.runtime.console import make_console
from vqgen.core.runtime.processes import process_state

# Evaluations cost at most this share of a run's training work. An evaluation passes every held-out item forward
# once; an item costs about EVAL_ITEM_COST of a training item's forward, backward and update (the quickstart's
# prior: ~6 s for 2,000 test grids against 0.23 s for a step of 32, docs/benchmarks.md "The training loop
# against the bare model"). Never fewer than FEWEST_EVALUATIONS, so that the kept weights are still chosen.
EVAL_SHARE = 0.08
EVAL_ITEM_COST = 0.4
FEWEST_EVALUATIONS = 4


def affordable_evaluations(wanted: int, steps: int, batch: int, held_out: int) -> int:
    """`wanted` evaluations of `held_out` items over `steps` training steps of `batch` items (all processes
    together), or fewer where they would cost more than EVAL_SHARE of the training work."""
    affordable = int(EVAL_SHARE * steps * batch / (EVAL_ITEM_COST * max(held_out, 1)))
    return max(FEWEST_EVALUATIONS, min(wanted, affordable))


def sized_schedule(given: dict[str, Any], steps: int, evaluations: int, batch: int = 0,
                   held_out: int = 0) -> dict[str, int]:
    """The training length the data calls for, `steps`, with `evaluations` evaluations (and saves) over
    the run, fewer where evaluating `held_out` items that often would cost more than EVAL_SHARE of training
    at `batch` (0: not counted). Options the user gave win."""
    chosen = given.get("max_steps", steps)
    planned = chosen or steps
    if batch and held_out:
        evaluations = affordable_evaluations(evaluations, planned, batch, held_out)
    every = max(50, math.ceil(planned / evaluations / 50) * 50)  # at most `evaluations`, the last included
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
