"""What both stages' entry points do around `fit`: settle the options, validate, then write, then start.

`train_vqvae` and `train_prior` call, in order: `as_options` on what they were given, `check_stage_dir`,
`train_config` (the defaults, or the run's saved options on resume) and their own configs, `check_batch_size`,
`start` (accelerator, console, seed), `write_stage_files` (only now is anything written), then
`vqgen.core.training.loop.fit`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console

from vqgen.core.runtime.console import make_console
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store.configs import load_config, save_config
from vqgen.core.store.layout import ModelDir
from vqgen.core.store.weights import clear_stage_dir
from vqgen.core.training.config import TrainConfig
from vqgen.core.training.loop import make_accelerator


def as_options(given: Any) -> dict[str, Any]:
    """The options given to an entry point: a dict of config fields as it is, a whole config as all its fields,
    None as none."""
    if given is None:
        return {}
    if dataclasses.is_dataclass(given):
        return {f.name: getattr(given, f.name) for f in dataclasses.fields(given)}
    return dict(given)


def train_config(stage: ModelDir, given: dict[str, Any], defaults: dict[str, Any], resume: bool) -> TrainConfig:
    """A fresh stage: the stage's defaults under the given options. Resuming: the saved options, with
    the given ones (a longer `max_steps`, say) on top."""
    if resume and stage.train_config.is_file():
        saved = load_config(TrainConfig, stage.train_config)
        cfg = dataclasses.replace(saved, **given)
        if cfg.weight_average != saved.weight_average:  # the saved states hold an average of that decay, or none
            raise VQGenError(f"cannot resume with weight_average={cfg.weight_average}: the run was trained with "
                             f"weight_average={saved.weight_average} ({stage.train_config}); resume without "
                             "--weight-average")
        return cfg
    return TrainConfig(**{**defaults, **given})


def check_batch_size(batch_size: int, available: int, what: str) -> None:
    if available < batch_size:
        raise VQGenError(f"batch size {batch_size} is larger than the {available} {what}: "
                         f"give a batch size of at most {available}")


def start(stage: ModelDir, cfg: TrainConfig) -> tuple[Accelerator, Console]:
    """The accelerator and console of a training run, with every RNG seeded."""
    accelerator = make_accelerator(cfg, stage)
    set_seed(cfg.seed)
    return accelerator, make_console(accelerator.is_main_process)


def write_stage_files(accelerator: Accelerator, stage: ModelDir, files: dict[Path, Any], fresh: bool) -> None:
    """Everything is validated: clear the stage folder for a fresh run (when overwriting), then write
    its configs. Main process only; every process waits for it."""
    if accelerator.is_main_process:
        if fresh:
            clear_stage_dir(stage)
        stage.path.mkdir(parents=True, exist_ok=True)
        for path, config in files.items():
            save_config(config, path)
    accelerator.wait_for_everyone()
