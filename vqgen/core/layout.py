"""The run directory: every folder and file name in `runs/NAME/`, in one place.

    runs/NAME/
      vqvae/     StageDir: config.json, model.safetensors, train_config.json, metrics.jsonl,
                 data_config.json, reconstructions/step-*.png, state/step-*/ (for --resume)
      codes/     the code grids (a `datasets` DatasetDict) + meta.json
      prior/     StageDir: config.json, model.safetensors, train_config.json, metrics.jsonl,
                 source.json, state/step-*/
      samples/   NNNN/ from each `vqgen sample`: grid.png, images/, codes.safetensors, settings.json
      judge/     config.json, model.safetensors: the classifier that scores samples (`vqgen eval --samples`)
      evaluations.jsonl   the sample-quality scores of each `vqgen eval --samples`

Stages, pipeline and CLI ask a `RunLayout` for paths; none spells a name itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CODES_META = "meta.json"
PROGRESS = "progress.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class StageDir:
    """One trained stage's folder: its model, its training record and its resumable states."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS

    @property
    def train_config(self) -> Path:
        return self.path / "train_config.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def data_config(self) -> Path:
        """Stage 1: the data options it was trained with."""
        return self.path / "data_config.json"

    @property
    def source(self) -> Path:
        """Stage 2: where its training codes came from."""
        return self.path / "source.json"

    @property
    def reconstructions(self) -> Path:
        """Stage 1: test originals over reconstructions at each evaluation."""
        return self.path / "reconstructions"

    @property
    def logs(self) -> Path:
        """Tracker output (TensorBoard, W&B)."""
        return self.path / "logs"

    @property
    def states(self) -> Path:
        return self.path / "state"

    def state(self, step: int) -> Path:
        return self.states / f"step-{step:08d}"

    def temporary_state(self, step: int) -> Path:
        """Where a state is written before it is renamed to `state(step)`."""
        return self.states / f".tmp-step-{step:08d}"

    def state_step(self, folder: Path) -> int | None:
        """The step of a completed state folder's name, None for anything else."""
        m = _STEP_DIR.match(folder.name)
        return int(m.group(1)) if m else None

    @property
    def trained(self) -> bool:
        return self.weights.is_file()


@dataclass(frozen=True)
class RunLayout:
    """A run directory: the two stage folders, the codes between them, the samples after."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def vqvae(self) -> StageDir:
        return StageDir(self.root / "vqvae")

    @property
    def prior(self) -> StageDir:
        return StageDir(self.root / "prior")

    @property
    def codes(self) -> Path:
        return self.root / "codes"

    @property
    def codes_meta(self) -> Path:
        return self.codes / CODES_META

    @property
    def judge(self) -> StageDir:
        """The small classifier `vqgen eval --samples` trains on the run's images to judge samples."""
        return StageDir(self.root / "judge")

    @property
    def evaluations(self) -> Path:
        """One JSON line per `vqgen eval --samples`: settings and scores."""
        return self.root / "evaluations.jsonl"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def reconstructions(self) -> Path:
        """`vqgen reconstruct`'s default output."""
        return self.root / "reconstructions.png"

    @property
    def completions(self) -> Path:
        """`vqgen complete`'s default output."""
        return self.root / "completions.png"

    def next_samples_dir(self) -> Path:
        """samples/NNNN, one past the highest number taken."""
        taken = [int(p.name) for p in self.samples.glob("[0-9][0-9][0-9][0-9]")] if self.samples.is_dir() else []
        return self.samples / f"{max(taken, default=-1) + 1:04d}"
