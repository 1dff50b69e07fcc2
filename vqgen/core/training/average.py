"""An exponential moving average of a model's weights, kept beside training (`TrainConfig.weight_average`).

The average is what a small dataset's prior is evaluated, kept and sampled with: the optimizer's weights
wander around the minimum that the last steps found, and their average sits nearer its centre. Every process
updates its own copy from the same weights after each optimizer step, so the copies stay equal without
communication; the main process saves its copy into each training state (safetensors), and resume loads it.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from vqgen.core.runtime.errors import VQGenError, one_line

AVERAGE_FILE = "average.safetensors"  # in a training state folder


def average_decay(decay: float, step: int) -> float:
    """The decay used after optimizer step `step` (1-based): `decay`, or less early on, (1 + step) / (10 + step),
    so that the average forgets its random start within the first few dozen steps of a short run."""
    return min(decay, (1 + step) / (10 + step))


class WeightAverage:
    """avg <- d * avg + (1 - d) * w for every floating-point parameter of `model`, in float32; buffers are not
    averaged (the model's own are used as they are). Holds the parameters themselves, so a model wrapped after
    this (DDP) is averaged through the same tensors."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = {name: p for name, p in model.named_parameters() if p.is_floating_point()}
        self.shadow: dict[str, Tensor] = {name: p.detach().float().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (1-based)."""
        weight = 1.0 - average_decay(self.decay, step)
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), weight)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The average in the model's parameters inside the block, the training weights back after it."""
        kept = {name: p.detach().clone() for name, p in self.params.items()}
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(kept[name])

    def save(self, folder: Path) -> None:
        save_file({name: t.contiguous().cpu() for name, t in self.shadow.items()}, str(folder / AVERAGE_FILE))

    def load(self, folder: Path) -> None:
        """The average saved in a training state; one line when the state has none or another model's."""
        path = folder / AVERAGE_FILE
        if not path.is_file():
            raise VQGenError(f"{folder} holds no weight average ({AVERAGE_FILE}): this run was trained without "
                             "--weight-average, and resuming cannot start one")
        try:
            saved = load_file(str(path))
        except Exception as err:  # noqa: BLE001 - a damaged file: say which
            raise VQGenError(f"cannot read the weight average {path}: {one_line(err)}") from None
        if saved.keys() != self.shadow.keys() or any(saved[n].shape != t.shape for n, t in self.shadow.items()):
            raise VQGenError(f"the weight average {path} does not fit this model")
        for name, t in self.shadow.items():
            t.copy_(saved[name])
