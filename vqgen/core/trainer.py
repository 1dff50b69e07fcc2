"""The one training loop both stages share: Accelerate, accumulation, resume, eval, export.

A stage hands `fit` a `Stage` (how to compute a loss, evaluate, export) and a model,
optimizer and loader; `fit` owns everything else: prepare, mixed precision, gradient
accumulation and clipping, the learning-rate schedule, the progress bar, the JSONL log
and trackers, periodic evaluation, atomic checkpoints and exact resume.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
from rich.console import Console
from torch import Tensor, nn

from vqgen.core.checkpoint import commit_state_dir, latest_state_dir, temporary_state_dir
from vqgen.core.config import save_config, write_json_atomic
from vqgen.core.console import make_console, make_progress
from vqgen.core.errors import VQGenError
from vqgen.core.metrics import JsonlLog

MIXED_PRECISION = ("no", "fp16", "bf16")
TRAIN_CONFIG = "train_config.json"
LR_SCHEDULES = ("cosine", "constant")
TRACKERS = ("none", "tensorboard", "wandb")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 128           # per process
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    max_steps: int = 0              # optimizer steps; 0 = use epochs
    epochs: int = 10
    grad_accum_steps: int = 1
    warmup_steps: int = 100
    lr_schedule: str = "cosine"     # cosine decays to min_lr_ratio * learning_rate
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0          # 0 = no clipping
    mixed_precision: str = "no"
    seed: int = 0
    log_every: int = 50
    eval_every: int = 1000          # 0 = only at the end
    save_every: int = 1000          # 0 = only at the end
    keep: int = 2                   # training states kept for --resume
    report_to: str = "none"

    def __post_init__(self):
        for name in ("batch_size", "grad_accum_steps", "epochs", "log_every"):
            if getattr(self, name) < 1:
                raise VQGenError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "eval_every", "save_every", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise VQGenError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise VQGenError(f"learning rate must be a positive number, got {self.learning_rate}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise VQGenError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.keep < 1:
            raise VQGenError(f"keep must be >= 1, got {self.keep}")
        for name, allowed in (("mixed_precision", MIXED_PRECISION), ("lr_schedule", LR_SCHEDULES),
                              ("report_to", TRACKERS)):
            if getattr(self, name) not in allowed:
                raise VQGenError(f"{name.replace('_', '-')} must be one of {allowed}, got {getattr(self, name)!r}")


def learning_rate_at(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Linear warm-up, then cosine decay (or constant): a pure function of the step, so resume is exact."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    ratio = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.learning_rate * ratio


def make_accelerator(cfg: TrainConfig, project_dir: str | Path) -> Accelerator:
    """The Accelerator both stages train with: seedable sampler so a resumed epoch replays its order."""
    log_with = None
    if cfg.report_to != "none":
        import importlib.util

        if importlib.util.find_spec(cfg.report_to) is None:
            raise VQGenError(f"--report-to {cfg.report_to} needs the package {cfg.report_to!r}: pip install {cfg.report_to}")
        log_with = cfg.report_to
    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(Path(project_dir) / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        step_scheduler_with_optimizer=False,
    )


class Stage(Protocol):
    """What a stage tells the loop."""

    name: str

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of one micro-batch and detached scalars to log."""

    def window_metrics(self) -> dict[str, float]:
        """Metrics over the steps since the last call (e.g. codebook usage); may be empty."""

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        """Test metrics; runs on every process, gathers across them."""

    def export(self, model: nn.Module) -> None:
        """Write the weights and config (called on the main process with the unwrapped model)."""


@dataclass
class Progress:
    step: int = 0             # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0   # micro-batches of the current epoch already consumed


def fit(
    accelerator: Accelerator,
    cfg: TrainConfig,
    stage: Stage,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: torch.utils.data.DataLoader,
    out_dir: str | Path,
    resume: bool = False,
    console: Console | None = None,
) -> dict[str, float]:
    """Train until `max_steps` (or `epochs`); return the last evaluation's metrics."""
    out_dir = Path(out_dir)
    console = console or make_console(accelerator.is_main_process)
    log = JsonlLog(out_dir / "metrics.jsonl", enabled=accelerator.is_main_process)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    steps_per_epoch = max(1, len(train_loader) // cfg.grad_accum_steps)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    progress = _resume(accelerator, out_dir, console) if resume else Progress()
    if accelerator.is_main_process:
        save_config(cfg, out_dir / TRAIN_CONFIG)
    if cfg.report_to != "none":
        accelerator.init_trackers(f"vqgen-{stage.name}", config=asdict(cfg))

    metrics: dict[str, float] = {}
    sums: dict[str, float] = {}
    n_logged, t_window = 0, time.perf_counter()
    with make_progress(console, stage.name) as bar:
        task = bar.add_task(stage.name, total=total, completed=progress.step, metrics="")
        while progress.step < total:
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(progress.epoch)
            loader = train_loader
            if progress.batch_in_epoch:
                loader = accelerator.skip_first_batches(train_loader, progress.batch_in_epoch)
            for batch in loader:
                with accelerator.accumulate(model):
                    loss, logs = stage.loss(model, batch)
                    _check_finite(accelerator, loss, progress.step, out_dir)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        if cfg.grad_clip:
                            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                        lr = learning_rate_at(cfg, progress.step, total)
                        for group in optimizer.param_groups:
                            group["lr"] = lr
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                progress.batch_in_epoch += 1
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n_logged += 1
                if not accelerator.sync_gradients:
                    continue
                progress.step += 1
                step = progress.step
                if step % cfg.log_every == 0 or step == total:
                    elapsed = time.perf_counter() - t_window
                    keys = list(sums)
                    means = torch.tensor([sums[k] / n_logged for k in keys], device=accelerator.device)
                    record = dict(zip(keys, accelerator.reduce(means, "mean").tolist()))
                    record.update(stage.window_metrics())
                    record["lr"] = optimizer.param_groups[0]["lr"]
                    record["samples_per_s"] = n_logged * cfg.batch_size * accelerator.num_processes / max(elapsed, 1e-9)
                    _emit(accelerator, log, "train", step, record)
                    bar.update(task, metrics=_short(record))
                    sums, n_logged, t_window = {}, 0, time.perf_counter()
                if (cfg.eval_every and step % cfg.eval_every == 0) or step == total:
                    metrics = stage.evaluate(model, step)
                    _emit(accelerator, log, "test", step, metrics)
                    console.print(f"[bold]{stage.name}[/] step {step}: " + _short(metrics))
                    model.train()
                    t_window = time.perf_counter()
                if (cfg.save_every and step % cfg.save_every == 0) or step == total:
                    _save(accelerator, stage, model, progress, out_dir, cfg.keep)
                bar.update(task, completed=step)
                if step >= total:
                    break
            else:
                progress.epoch += 1
                progress.batch_in_epoch = 0
    for tracker in accelerator.trackers:  # not end_training(): that also ends the process group,
        tracker.finish()                   # and stage 1 still encodes the dataset across processes
    return metrics


def _check_finite(accelerator: Accelerator, loss: Tensor, step: int, out_dir: Path) -> None:
    bad = torch.tensor(0.0 if torch.isfinite(loss.detach()).all() else 1.0, device=accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "sum")
    if bad.item():
        last = latest_state_dir(out_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise VQGenError(
            f"loss became {loss.item()} at step {step + 1}; training stopped and {kept} "
            "(lower --lr or use --mixed-precision no, then --resume)"
        )


def _emit(accelerator: Accelerator, log: JsonlLog, split: str, step: int, record: dict[str, float]) -> None:
    log.write({"split": split, "step": step, "time": time.time(), **record})
    if accelerator.log_with:
        accelerator.log({f"{split}/{k}": v for k, v in record.items()}, step=step)


def _short(record: dict[str, float]) -> str:
    skip = {"lr", "time"}
    return "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in skip)


def _save(accelerator: Accelerator, stage: Stage, model: nn.Module, progress: Progress, out_dir: Path, keep: int) -> None:
    """Export the weights, then write the full state to a temporary folder and rename it into place."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        stage.export(accelerator.unwrap_model(model))
    tmp = temporary_state_dir(out_dir, progress.step)
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(asdict(progress), tmp / "progress.json")
        commit_state_dir(out_dir, progress.step, keep)
    accelerator.wait_for_everyone()


def _resume(accelerator: Accelerator, out_dir: Path, console: Console) -> Progress:
    state = latest_state_dir(out_dir)
    if state is None:
        raise VQGenError(f"--resume: no saved training state under {out_dir / 'state'} (train without --resume first)")
    accelerator.load_state(str(state))
    progress = Progress(**json.loads((state / "progress.json").read_text()))
    console.print(f"resumed from {state} (step {progress.step}, epoch {progress.epoch})")
    return progress
