"""Pictures made after training (`vqgen sample`'s grid), sent to the tracker the stage trained with.

The training loop logs through Accelerate's trackers; the prior's training draws no samples, so the sample
grid reaches TensorBoard or W&B here, in the same logs folder and project as the prior's training.
"""

from __future__ import annotations

import importlib.util

from torch import Tensor

from vqgen.core.runtime.errors import VQGenError, one_line
from vqgen.core.store.configs import read_json
from vqgen.core.store.imageio import to_pil
from vqgen.core.store.jsonl import JsonlLog
from vqgen.core.store.layout import ModelDir


def trained_with(stage: ModelDir) -> str:
    """The tracker the stage trained with (`report_to` of its train_config.json): none, tensorboard or wandb."""
    if not stage.train_config.is_file():
        return "none"
    try:
        config = read_json(stage.train_config, "training config")
    except VQGenError:
        return "none"
    tracker = config.get("report_to", "none") if isinstance(config, dict) else "none"
    return tracker if tracker in ("tensorboard", "wandb") else "none"


def best_step(stage: ModelDir) -> int:
    """The step of the weights in use: the last evaluation's `best_step` (0 before any)."""
    tests = [r for r in JsonlLog(stage.metrics).read() if r.get("split") == "test"]
    step = tests[-1].get("best_step") if tests else 0
    return step if isinstance(step, int) else 0


def log_image(stage: ModelDir, tag: str, image: Tensor) -> str | None:
    """Log a (c, H, W) uint8 image to the stage's tracker at its best step; the tracker's name, or None when
    it trained with none. A missing package or a failed write is a one-line VQGenError."""
    tracker = trained_with(stage)
    if tracker == "none":
        return None
    if importlib.util.find_spec(tracker) is None:
        raise VQGenError(f"{stage.path} trained with report_to={tracker!r} but {tracker!r} is not installed: "
                         f"pip install {tracker}")
    run_name, step = f"vqgen-{stage.path.name}", best_step(stage)  # as the training's trackers named it
    try:
        if tracker == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(stage.logs / run_name))
            writer.add_image(tag, image, global_step=step)  # (c, H, W)
            writer.close()
        else:
            import wandb

            stage.logs.mkdir(parents=True, exist_ok=True)
            run = wandb.init(project=run_name, dir=str(stage.logs), job_type="sample")
            run.log({tag: wandb.Image(to_pil(image))}, step=step)
            run.finish()
    except Exception as err:  # noqa: BLE001 - a library's error, reported in one line
        raise VQGenError(f"cannot log {tag} to {tracker} in {stage.logs}: {one_line(err)}") from None
    return tracker
