"""How a stage trains (batch, optimizer, schedule, precision, logging, checkpoints), as a config saved beside
the weights. No torch here: the command-line parsers read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store.configs import option

MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULES = ("cosine", "constant")
TRACKERS = ("none", "tensorboard", "wandb")


@dataclass(frozen=True)
class TrainConfig:
    """How a stage trains: batch, optimizer, schedule, precision, logging and checkpoints."""

    batch_size: int = option(128, "batch size per process")
    learning_rate: float = option(3e-4, "peak learning rate", aliases=("--lr",))
    weight_decay: float = option(0.0, "AdamW weight decay, on the weight matrices of linear and conv layers only")
    max_steps: int = option(0, "optimizer steps to train (0: use --epochs)")
    epochs: int = option(10, "passes over the training data when --max-steps is 0")
    grad_accum_steps: int = option(1, "micro-batches per optimizer step")
    warmup_steps: int = option(100, "steps of linear learning-rate warm-up")
    lr_schedule: str = option("cosine", "learning rate after warm-up: cosine decays to --min-lr-ratio of the peak",
                              choices=LR_SCHEDULES)
    min_lr_ratio: float = option(0.1, "final learning rate of the cosine schedule, as a fraction of the peak")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: no clipping)")
    mixed_precision: str = option("no", "autocast precision (the quantizer stays fp32)", choices=MIXED_PRECISION)
    seed: int = option(0, "seed of initialisation, data order and dropout")
    log_every: int = option(50, "log training metrics every N steps")
    eval_every: int = option(1000, "evaluate on the test split every N steps (0: at the end only)")
    save_every: int = option(1000, "save weights and a resumable state every N steps (0: at the end only)")
    keep: int = option(2, "resumable training states kept")
    patience: int = option(5, "stop after this many evaluations without a better test metric (0: never)",
                           since=2)
    report_to: str = option("none", "also log to this tracker (its package must be installed)", choices=TRACKERS)
    report: bool | None = option(None, "refresh the run's report.html (curves, codes, images, configs) at each "
                                 "evaluation (unset: when matplotlib is installed)", since=3)
    num_workers: int | None = option(None, "DataLoader worker processes that build (and, for streamed images, "
                                           "decode) the batches; the batches are the same for any number "
                                           "(default: 0 for data in memory, min(4, CPUs) when streamed)", since=3)
    compile: bool = option(False, "torch.compile the model's forward pass (faster steps on a GPU after a slow "
                           "first one; needs Triton on CUDA or a C++ compiler on the CPU)", since=3)
    weight_average: float = option(0.0, "stage 2: the decay of an exponential moving average of the weights kept "
                                        "beside the training (e.g. 0.999; 0: off); evaluation, the kept best "
                                        "weights and so sampling use the average", since=8)
    tf32: bool = option(True, "let float32 matmuls and convolutions use TF32 on NVIDIA GPUs (Ampere and newer)",
                        since=3)

    def __post_init__(self):
        for name in ("batch_size", "grad_accum_steps", "epochs", "log_every"):
            if getattr(self, name) < 1:
                raise VQGenError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "eval_every", "save_every", "weight_decay", "grad_clip", "patience"):
            if getattr(self, name) < 0:
                raise VQGenError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise VQGenError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise VQGenError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.weight_average < 1.0:
            raise VQGenError(f"weight_average must be in [0, 1) (0: off), got {self.weight_average}")
        if self.keep < 1:
            raise VQGenError(f"keep must be >= 1, got {self.keep}")
        if self.num_workers is not None and self.num_workers < 0:
            raise VQGenError(f"num_workers must be >= 0 (or unset: chosen by the data), got {self.num_workers}")
        for name, allowed in (("mixed_precision", MIXED_PRECISION), ("lr_schedule", LR_SCHEDULES),
                              ("report_to", TRACKERS)):
            if getattr(self, name) not in allowed:
                raise VQGenError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
