"""The one training loop both stages share: Accelerate, accumulation, resume, eval, export.

A stage hands `fit` a `TrainingTask` (its model config, how to compute a loss, evaluate) and a model,
optimizer and loader; `fit` owns everything else: prepare, mixed precision, gradient
accumulation and clipping, the learning-rate schedule, the progress bar, the JSONL log
and trackers, periodic evaluation, atomic checkpoints and exact resume.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
from rich.console import Console
from torch import Tensor, nn

from vqgen.core.data.loaders import stop_workers
from vqgen.core.report import figures
from vqgen.core.report.page import write_report
from vqgen.core.runtime.console import make_console, make_progress
from vqgen.core.runtime.errors import TrainingStopped, VQGenError, one_line
from vqgen.core.runtime.signals import StopSignals
from vqgen.core.store.configs import save_config
from vqgen.core.store.imageio import to_pil
from vqgen.core.store.jsonl import JsonlLog
from vqgen.core.store.layout import ModelDir
from vqgen.core.store.weights import latest_state_dir, load_weights
from vqgen.core.training.average import WeightAverage
from vqgen.core.training.best import HeldOut
from vqgen.core.training.checkpoints import Progress, export_weights, resume_state, save_state
from vqgen.core.training.config import TrainConfig

REPORT_SHARE = 0.05  # at most this share of the training time goes to refreshing the report (the last: always)




def learning_rate_at(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Linear warm-up, then cosine decay (or constant): a pure function of the step, so resume is exact."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    ratio = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.learning_rate * ratio


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW that decays only the weight matrices of linear and convolution layers: not biases, norms,
    embeddings or the codebook, which weight decay would shrink towards zero for no gain."""
    decay, rest = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            is_matrix = name == "weight" and isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
            (decay if is_matrix else rest).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate)


def check_compile(device: torch.device) -> None:
    """Refuse `--compile` where torch cannot compile, before anything is written."""
    import shutil

    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise VQGenError(f"--compile: torch {torch.__version__} cannot compile on this Python "
                         "(torch.compile is not supported here); train without --compile")
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise VQGenError("--compile on CUDA needs the triton package, which is not installed; "
                             "pip install triton, or train without --compile")
    elif device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise VQGenError("--compile on the CPU needs a C++ compiler (g++, c++ or clang++), none found on PATH; "
                         "install one, or train without --compile")


def compile_model(model: nn.Module) -> None:
    """Compile in place (`nn.Module.compile`): parameter names, checkpoints and resume are unchanged. A
    model may name the submodules worth compiling (`compile_targets()`), e.g. the VQ-VAE's convolutional
    trunk without the quantizer's data-dependent codebook upkeep."""
    targets = model.compile_targets() if hasattr(model, "compile_targets") else [model]
    for module in targets:
        module.compile()


def make_accelerator(cfg: TrainConfig, stage_dir: ModelDir) -> Accelerator:
    """The Accelerator both stages train with: seedable sampler so a resumed epoch replays its order."""
    log_with = None
    if cfg.report_to != "none":
        import importlib.util

        if importlib.util.find_spec(cfg.report_to) is None:
            raise VQGenError(f"report_to={cfg.report_to!r} needs the package {cfg.report_to!r}: "
                             f"pip install {cfg.report_to}")
        log_with = cfg.report_to
    if cfg.report and not figures.available():
        raise VQGenError('report=True needs matplotlib, which is not installed: pip install "vqgen[report]", '
                         "or train without the report")
    if torch.cuda.is_available():  # process-wide; the defaults of torch differ between versions
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(stage_dir.path), logging_dir=str(stage_dir.logs)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        step_scheduler_with_optimizer=False,
    )
    if cfg.compile:
        check_compile(accelerator.device)
    return accelerator


class TrainingTask(Protocol):
    """What a stage tells the loop: what it trains, its loss, its held-out evaluation."""

    name: str
    config: Any                      # the model config, saved beside the weights
    held_out: tuple[str, str]        # (test metric, its training counterpart); lower is better

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of one micro-batch and detached scalar tensors to log (left on the device)."""

    def window_metrics(self) -> dict[str, float]:
        """Metrics over the steps since the last call (e.g. codebook usage); may be empty."""

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        """Test metrics; runs on every process, gathers across them."""

    # optional: held_out_within: (a higher-is-better test metric, slack) | None: keep the best held-out metric
    #   only among evaluations within the slack of that metric's best (`vqgen.core.training.best.HeldOut`)
    # optional: def eval_images(self) -> dict[str, Tensor]: the last evaluation's pictures for the trackers,
    # name -> (c, H, W) uint8, on the main process (stage 1: its reconstructions)
    # optional: def at_step(self, step: int) -> None: the optimizer steps done, told before each micro-batch
    # optional, a second model trained beside the first with an optimizer of its own (stage 1: the discriminator):
    #   def auxiliary(self) -> tuple[nn.Module, torch.optim.Optimizer] | None: built, not prepared; `fit` prepares
    #       them after the model, so the state saves and resumes them too (model_1, optimizer_1)
    #   def auxiliary_loss(self, aux: nn.Module) -> tuple[Tensor, dict[str, Tensor]] | None: after each
    #       micro-batch's step of the model, the prepared auxiliary model's loss (None: it rests this micro-batch)


class _Window:
    """Sums of the logged scalars and the first non-finite loss since the last logging step, kept on
    the device: nothing here waits for the device until `read` at a logging, eval or save step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}  # a key logged on only some micro-batches is averaged over those
        self.micro_batches = 0
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.bad_value = torch.zeros((), device=self.device)
        self.started = time.perf_counter()

    def add(self, step: int, loss: Tensor, logs: dict[str, Tensor], micro_batch: bool = True) -> None:
        """One loss and its logs; `micro_batch` False for a second loss of the same micro-batch."""
        for k, v in logs.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.micro_batches += micro_batch
        bad = ~torch.isfinite(loss.detach()).all() & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(bad, step, self.first_bad_step)
        self.bad_value = torch.where(bad, loss.detach().float(), self.bad_value)

    def check_finite(self, accelerator: Accelerator, stage_dir: ModelDir) -> None:
        """One sync: stop if any process saw a non-finite loss since the last check."""
        first = self.first_bad_step.clone()
        if accelerator.num_processes > 1:  # the earliest bad step: a max over negated steps (reduce has no min)
            none = torch.iinfo(torch.long).min
            first = -accelerator.reduce(torch.where(first < 0, none + 1, -first), "max")
            first = torch.where(first == -(none + 1), -1, first)
        step = int(first)
        if step >= 0:
            last = latest_state_dir(stage_dir)
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise VQGenError(
                f"loss became {float(self.bad_value)} at step {step + 1}; training stopped and {kept} "
                "(lower the learning rate or train without mixed precision, then resume)"
            )

    def means(self, accelerator: Accelerator) -> dict[str, float]:
        keys = list(self.sums)
        if not keys:
            return {}
        means = torch.stack([self.sums[k] / self.counts[k] for k in keys])
        return dict(zip(keys, accelerator.reduce(means, "mean").tolist()))


def fit(
    accelerator: Accelerator,
    cfg: TrainConfig,
    task: TrainingTask,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: torch.utils.data.DataLoader,
    stage_dir: ModelDir,
    resume: bool = False,
    console: Console | None = None,
) -> dict[str, float]:
    """Train until `max_steps` (or `epochs`), or until the test metric stops improving for `patience`
    evaluations; return the metrics of the best evaluation.

    The weights of the best evaluation are the stage's `model.safetensors` (what later commands load)
    and are back in `model` on return; with `weight_average`, every evaluation scores the weight average
    (`WeightAverage`), so the kept weights are an average's. The newest `state/` holds the last step, for
    resume. The device is synchronised only at logging, evaluation and save steps. A first SIGTERM/SIGINT
    ends the run after the current step with a resumable state and `TrainingStopped`; a second one exits at
    once.
    """
    console = console or make_console(accelerator.is_main_process)
    log = JsonlLog(stage_dir.metrics, enabled=accelerator.is_main_process)
    if cfg.compile:
        compile_model(model)
    auxiliary = task.auxiliary() if hasattr(task, "auxiliary") else None
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    aux_model, aux_optimizer = accelerator.prepare(*auxiliary) if auxiliary else (None, None)
    models = (model,) if aux_model is None else (model, aux_model)
    average = WeightAverage(accelerator.unwrap_model(model), cfg.weight_average) if cfg.weight_average else None
    steps_per_epoch = max(1, len(train_loader) // cfg.grad_accum_steps)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    progress = resume_state(accelerator, stage_dir, console, average) if resume else Progress()
    if accelerator.is_main_process:
        save_config(cfg, stage_dir.train_config)
    if cfg.report_to != "none":
        if cfg.report_to == "wandb" and accelerator.is_main_process:
            stage_dir.logs.mkdir(parents=True, exist_ok=True)  # W&B writes into the run, not the working directory
        accelerator.init_trackers(f"vqgen-{task.name}", config=asdict(cfg),
                                  init_kwargs={"wandb": {"dir": str(stage_dir.logs)}})

    held = HeldOut(*task.held_out, patience=cfg.patience, within=getattr(task, "held_out_within", None),
                   **progress.held_out)
    best: dict[str, float] = {}
    last_train: dict[str, float] = {}
    stop = False
    stopped_by = 0  # the signal every process stopped for
    window = _Window(accelerator.device)
    report_due = 0.0  # an evaluation before this time (but the last) skips the report: see REPORT_SHARE
    with StopSignals(announce=accelerator.is_main_process) as signals, make_progress(console, task.name) as bar:
        bar_task = bar.add_task(task.name, total=total, completed=progress.step, metrics="")
        while progress.step < total:
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(progress.epoch)
            loader = train_loader
            if progress.batch_in_epoch:
                loader = accelerator.skip_first_batches(train_loader, progress.batch_in_epoch)
            for batch in loader:
                if hasattr(task, "at_step"):
                    task.at_step(progress.step)
                with accelerator.accumulate(*models):
                    loss, logs = task.loss(model, batch)
                    window.add(progress.step, loss, logs)
                    lr = learning_rate_at(cfg, progress.step, total)
                    _optimizer_step(accelerator, cfg, model, optimizer, loss, lr)
                    aux = task.auxiliary_loss(aux_model) if aux_model is not None else None
                    if aux is not None:
                        window.add(progress.step, aux[0], aux[1], micro_batch=False)
                        _optimizer_step(accelerator, cfg, aux_model, aux_optimizer, aux[0], lr)
                progress.batch_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue
                progress.step += 1
                step = progress.step
                if average is not None:
                    average.update(step)
                log_now = step % cfg.log_every == 0 or step == total
                eval_now = (cfg.eval_every and step % cfg.eval_every == 0) or step == total
                save_now = (cfg.save_every and step % cfg.save_every == 0) or step == total
                if log_now or eval_now or save_now:
                    window.check_finite(accelerator, stage_dir)
                if log_now:
                    elapsed = time.perf_counter() - window.started
                    record = window.means(accelerator)
                    record.update(task.window_metrics())
                    record["lr"] = optimizer.param_groups[0]["lr"]
                    record["samples_per_s"] = (window.micro_batches * cfg.batch_size * accelerator.num_processes
                                               / max(elapsed, 1e-9))
                    _emit(accelerator, log, "train", step, record)
                    bar.update(bar_task, metrics=_short(record))
                    last_train = record
                    window.reset()
                if eval_now:
                    with average.applied() if average else nullcontext():
                        metrics = task.evaluate(model, step)  # the average's, when one is kept ...
                        verdict = held.update(step, metrics, last_train)
                        if verdict.improved:
                            best = metrics
                            export_weights(accelerator, model, task.config, stage_dir)  # ... and so its weights
                    _emit(accelerator, log, "test", step, {**metrics, **held.record()})
                    console.print(f"[bold]{task.name}[/] step {step}: " + _short(metrics)
                                  + ("  (best)" if verdict.improved else f"  (best: step {held.best_step})"))
                    if verdict.warning:
                        console.print(f"[bold yellow]warning:[/] {verdict.warning}")
                    _log_images(accelerator, task, step)
                    if step >= total or verdict.stop or time.perf_counter() >= report_due:
                        report_due = time.perf_counter() + refresh_report(accelerator, cfg, stage_dir, console) * (
                            1 / REPORT_SHARE - 1)
                    stop = verdict.stop
                    model.train()
                    window.started = time.perf_counter()
                if save_now or stop:
                    progress.held_out = held.state()
                    save_state(accelerator, progress, stage_dir, cfg.keep, average)
                bar.update(bar_task, completed=step)
                if stop:
                    console.print(f"{task.name}: stopped early at step {step}: {held.stalled()} (patience "
                                  f"{cfg.patience}); keeping step {held.best_step} ({held.best_value:.4g})")
                else:
                    stopped_by = signals.agreed(accelerator, step, synced=log_now or eval_now or save_now)
                    if stopped_by and not save_now:
                        progress.held_out = held.state()
                        save_state(accelerator, progress, stage_dir, cfg.keep, average)
                if step >= total or stop or stopped_by:
                    break
            else:
                progress.epoch += 1
                progress.batch_in_epoch = 0
            if stop or stopped_by:
                break
    stop_workers(train_loader)  # its workers would otherwise idle, holding memory, through the code dump
    for tracker in accelerator.trackers:  # not end_training(): that also ends the process group,
        tracker.finish()                   # and stage 1 still encodes the dataset across processes
    if stopped_by:
        raise TrainingStopped(f"{task.name}: stopped by {signal.Signals(stopped_by).name} after step "
                              f"{progress.step} of {total}; resumable state: {stage_dir.state(progress.step)}",
                              exit_code=128 + stopped_by, main_process=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    load_weights(accelerator.unwrap_model(model), stage_dir.weights)  # the best weights, on every process
    return {**best, **held.record()}


def _optimizer_step(accelerator: Accelerator, cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                    loss: Tensor, lr: float) -> None:
    """Backward, then (at the last micro-batch of a step) clip and set the learning rate (a group may ask for
    a multiple: its "lr_ratio"), then the optimizer's step, which Accelerate skips until that micro-batch."""
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        if cfg.grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_ratio", 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _emit(accelerator: Accelerator, log: JsonlLog, split: str, step: int, record: dict[str, float]) -> None:
    log.write({"split": split, "step": step, "time": time.time(), **record})
    if accelerator.log_with:
        accelerator.log({f"{split}/{k}": v for k, v in record.items()}, step=step)


def _log_images(accelerator: Accelerator, task: TrainingTask, step: int) -> None:
    """The last evaluation's pictures to the trackers (there are none off the main process)."""
    images = task.eval_images() if hasattr(task, "eval_images") else {}
    for tracker in accelerator.trackers:
        for name, image in images.items():  # (c, H, W) uint8
            if tracker.name == "tensorboard":
                tracker.log_images({f"test/{name}": image.unsqueeze(0)}, step=step)  # add_images: (n, c, H, W)
            elif tracker.name == "wandb":
                tracker.log_images({f"test/{name}": [to_pil(image)]}, step=step)


def refresh_report(accelerator: Accelerator, cfg: TrainConfig, stage_dir: ModelDir, console: Console) -> float:
    """Rewrite the run's report.html (main process; unless `cfg.report` is off, or unset and matplotlib
    missing); a failure costs one warning line, never the training. Returns the seconds it took."""
    if not accelerator.is_main_process or cfg.report is False or not figures.available():
        return 0.0
    start = time.perf_counter()
    try:
        write_report(stage_dir.path.parent)
    except Exception as err:  # noqa: BLE001 - a picture is not worth a training run
        console.print(f"[bold yellow]warning:[/] the report was not refreshed: {one_line(err)}")
    return time.perf_counter() - start


def _short(record: dict[str, float]) -> str:
    skip = {"lr", "time"}
    return "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in skip)
