"""The run directory: every folder and file name in `runs/NAME/`, in one place.

    runs/NAME/
      vqvae/     StageDir: config.json, model.safetensors, train_config.json, metrics.jsonl,
                 data_config.json, reconstructions/step-*.png, state/step-*/ (for --resume; each
                 with progress.json and manifest.json), .lock (while a training or encoding runs)
      codes/     the code grids (a `datasets` DatasetDict) + meta.json
      prior/     StageDir: config.json, model.safetensors, train_config.json, metrics.jsonl,
                 source.json, state/step-*/
      samples/   NNNN/ from each `vqgen sample`: SampleSetDir: grid.png, images/, codes.safetensors,
                 settings.json
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
MANIFEST = "manifest.json"   # in a state folder: every file's size and sha256, written last
LOCK = ".lock"               # in a stage folder: who is writing it now
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

    @property
    def lock(self) -> Path:
        """Held (flock) by the one process training into this folder or encoding from it."""
        return self.path / LOCK

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
class SampleSetDir:
    """One `vqgen sample` output folder (or the temporary folder it is written in)."""

    path: Path

    @property
    def grid(self) -> Path:
        return self.path / "grid.png"

    @property
    def images(self) -> Path:
        return self.path / "images"

    def image(self, index: int, n: int) -> Path:
        """Sample `index` of `n`: images/00000.png, numbered by the sample, at least five digits."""
        return self.images / f"{index:0{max(5, len(str(n - 1)))}d}.png"

    @property
    def codes(self) -> Path:
        """One int16 tensor "codes" (n, h, w) in safetensors format."""
        return self.path / "codes.safetensors"

    @property
    def settings(self) -> Path:
        return self.path / "settings.json"


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
