"""What both training stages do around `fit`: settle the options, validate, then write, then start.

A stage script calls, in order: `train_config` (defaults, or the run's saved options on resume),
`check_stage_dir` and its own validation, `check_batch_size`, `start` (accelerator, console, seed),
`write_stage_files` (only now is anything written), then `vqgen.core.trainer.fit`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console

from vqgen.core.agree import process_state
from vqgen.core.checkpoint import clear_stage_dir
from vqgen.core.config import resumed_config, save_config
from vqgen.core.console import make_console
from vqgen.core.errors import VQGenError
from vqgen.core.layout import StageDir
from vqgen.core.trainer import TrainConfig, make_accelerator


def train_config(stage: StageDir, given: dict[str, Any], defaults: dict[str, Any], resume: bool) -> TrainConfig:
    """A fresh stage: the stage's defaults under the given options. Resuming: the saved options, with
    the given ones (a longer `max_steps`, say) on top."""
    if resume and stage.train_config.is_file():
        return resumed_config(TrainConfig, stage.train_config, given, strict=False, what="training options")
    return TrainConfig(**{**defaults, **given})


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


def sized_model_options(given_model: dict[str, Any], given_training: dict[str, Any], sized_model: dict[str, Any],
                        sized_training: dict[str, Any], resume: bool) -> dict[str, Any]:
    """The model options of a fresh run: the data-sized ones under those given; says what the rule chose.
    A resumed run keeps its saved model: only the given options, to be checked against it."""
    if resume:
        return given_model
    given = {**given_model, **given_training}
    chosen = {k: v for k, v in {**sized_model, **sized_training}.items() if k not in given}
    make_console(process_state().is_main_process).print(
        "defaults sized to the data: " + (", ".join(f"{k} {v}" for k, v in chosen.items()) or "none (all given)"))
    return {**sized_model, **given_model}


def check_batch_size(batch_size: int, available: int, what: str) -> None:
    if available < batch_size:
        raise VQGenError(f"batch size {batch_size} is larger than the {available} {what}: "
                         f"give a batch size of at most {available}")


def start(stage: StageDir, cfg: TrainConfig) -> tuple[Accelerator, Console]:
    """The accelerator and console of a training run, with every RNG seeded."""
    accelerator = make_accelerator(cfg, stage)
    set_seed(cfg.seed)
    return accelerator, make_console(accelerator.is_main_process)


def write_stage_files(accelerator: Accelerator, stage: StageDir, files: dict[Path, Any], fresh: bool) -> None:
    """Everything is validated: clear the stage folder for a fresh run (when overwriting), then write
    its configs. Main process only; every process waits for it."""
    if accelerator.is_main_process:
        if fresh:
            clear_stage_dir(stage)
        stage.path.mkdir(parents=True, exist_ok=True)
        for path, config in files.items():
            save_config(config, path)
    accelerator.wait_for_everyone()
