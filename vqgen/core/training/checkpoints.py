"""What the training loop writes and reads back: the stage's weights and its resumable states.

A state is written by every process into `state/.tmp-step-N` (Accelerate's `save_state`), completed by
the main process with progress.json and, last, manifest.json, and renamed to `state/step-N`. A failed
write on any process stops every process with one line; the earlier states and weights stay as they
were and no temporary folder is left. Resuming checks the newest state against its manifest and falls
back, with a warning naming the damaged file, to the newest intact one.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from rich.console import Console
from torch import nn

from vqgen.core.runtime.errors import VQGenError, one_line
from vqgen.core.runtime.processes import first_error, from_main, raise_together
from vqgen.core.store.atomic import remove, writing
from vqgen.core.store.configs import write_json_atomic
from vqgen.core.store.layout import PROGRESS, ModelDir
from vqgen.core.store.manifest import write_manifest
from vqgen.core.store.weights import commit_state_dir, newest_intact_state, save_model
from vqgen.core.training.average import WeightAverage


@dataclass
class Progress:
    step: int = 0             # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0   # micro-batches of the current epoch already consumed
    held_out: dict = field(default_factory=dict)  # `HeldOut.state()`; empty in states of vqgen < 0.2


def export_weights(accelerator: Accelerator, model: nn.Module, config: Any, stage_dir: ModelDir) -> None:
    """The model as it is now becomes the stage's weights (config.json + model.safetensors)."""
    accelerator.wait_for_everyone()
    error = None
    if accelerator.is_main_process:
        try:
            save_model(accelerator.unwrap_model(model), config, stage_dir.path)
        except VQGenError as err:
            error = str(err)
    raise_together(accelerator, error, main_only=True)


def save_state(accelerator: Accelerator, progress: Progress, stage_dir: ModelDir, keep: int,
               average: WeightAverage | None = None) -> Path:
    """Write the full training state (with the weight average, if one is kept) to a temporary folder, list it
    in a manifest, rename it into place."""
    accelerator.wait_for_everyone()
    tmp = stage_dir.temporary_state(progress.step)
    error = None
    try:
        with writing(tmp):
            accelerator.save_state(str(tmp), safe_serialization=True)
    except VQGenError as err:
        error = str(err)
    error = first_error(accelerator, error)  # every process has written its part, or one has failed
    if error is None and accelerator.is_main_process:
        try:
            with writing(tmp):
                write_json_atomic(asdict(progress), tmp / PROGRESS)
                if average is not None:
                    average.save(tmp)
                write_manifest(tmp)  # last: a state without its manifest was never finished
                commit_state_dir(stage_dir, progress.step, keep)
        except VQGenError as err:
            error = str(err)
    if error is None:
        error = from_main(accelerator, error)
    if error:
        if accelerator.is_main_process:
            remove(tmp)
        raise VQGenError(error)
    return stage_dir.state(progress.step)


def resume_state(accelerator: Accelerator, stage_dir: ModelDir, console: Console,
                 average: WeightAverage | None = None) -> Progress:
    """Load the newest intact state on every process (the main process checks, the others follow), with the
    weight average when one is kept."""
    found, error = None, None
    if accelerator.is_main_process:
        try:
            path, skipped = newest_intact_state(stage_dir)
            found = str(path)
            for line in skipped:
                console.print(f"[bold yellow]warning:[/] {line}")
        except VQGenError as err:
            error = str(err)
    raise_together(accelerator, error, main_only=True)
    state = Path(from_main(accelerator, found))
    try:
        accelerator.load_state(str(state))
        saved = json.loads((state / PROGRESS).read_text())
    except Exception as err:  # a state that passed its checks but does not fit this model or optimizer
        raise VQGenError(f"cannot load the training state {state}: {one_line(err)}; a state saved by another "
                         "vqgen version resumes only with that version: finish the run with it, or start again "
                         "with --overwrite") from None
    if average is not None:
        average.load(state)
    known = {f.name for f in dataclasses.fields(Progress)}
    progress = Progress(**{k: v for k, v in saved.items() if k in known})
    console.print(f"resumed from {state} (step {progress.step}, epoch {progress.epoch})")
    return progress
