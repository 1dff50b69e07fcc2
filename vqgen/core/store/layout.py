"""The run directory: every folder and file name in `runs/NAME/`, in one place.

    runs/NAME/
      vqvae/     ModelDir: config.json, model.safetensors, train_config.json, metrics.jsonl,
                 data_config.json, gan_config.json (adversarial/perceptual terms, when on),
                 perceptual_net/ (config.json, model.safetensors: the network of perceptual own_features),
                 reconstructions/step-*.png, state/step-*/ (for --resume; each with progress.json and
                 manifest.json; model_1/optimizer_1: the discriminator), .lock (while a training or encoding runs)
      codes/     meta.json and, per split, SPLIT/shard-NNNNN.safetensors ("codes": int16 (k, h', w'), in
                 dataset order) and SPLIT/labels.safetensors; runs of format 2: a `datasets` DatasetDict
      prior/     ModelDir: config.json, model.safetensors, train_config.json, metrics.jsonl,
                 source.json, state/step-*/
      samples/   NNNN/ from each `vqgen sample`: SampleSetDir: grid.png, images/, codes.safetensors,
                 settings.json
      judge/     config.json, model.safetensors: the classifier that scores samples (`vqgen eval --samples`)
      evaluations.jsonl   the sample-quality scores of each `vqgen eval --samples`
      closest_pairs.png   the newest `vqgen eval --samples`' samples nearest to a training image, beside it
      report.html         `vqgen report` (and training, at each evaluation): curves, codes, images, configs

An exported model (`vqgen export`, the folder a Hugging Face Hub repo holds) keeps the same names for the
parts it carries (vqvae/ and prior/ without state/, codes/meta.json without the grids, evaluations.jsonl)
and adds README.md (the model card), samples.png (the newest sample grid) and manifest.json (every file's
size and sha256). Commands that read such a model write under outputs/NAME/ (`model_outputs`) instead.

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
MODEL_CARD = "README.md"     # an exported model's card, with Hugging Face Hub front matter
SAMPLE_GRID = "samples.png"  # an exported model's picture: the run's newest sample grid
MODEL_OUTPUTS = "outputs"    # where commands reading an exported or downloaded model write: outputs/NAME/
MAX_CODEBOOK_SIZE = 2**15  # the code grids are stored as int16 (codes/SPLIT/shard-*.safetensors)
_STEP_DIR = re.compile(r"^step-(\d+)$")


def codes_shard(codes: Path, split: str, index: int) -> Path:
    """Shard `index` of a split's code grids in a codes folder: train/shard-00000.safetensors."""
    return Path(codes) / split / f"shard-{index:05d}.safetensors"


def codes_labels(codes: Path, split: str) -> Path:
    """A split's labels (int64 (n,)) in a codes folder."""
    return Path(codes) / split / "labels.safetensors"


@dataclass(frozen=True)
class ModelDir:
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
    def gan_config(self) -> Path:
        """Stage 1: its adversarial and perceptual options, when it was trained with any."""
        return self.path / "gan_config.json"

    @property
    def perceptual_net(self) -> ModelDir:
        """Stage 1: the network its perceptual own_features term compares features in, when it has that term."""
        return ModelDir(self.path / "perceptual_net")

    @property
    def source(self) -> Path:
        """Stage 2: where its training codes came from."""
        return self.path / "source.json"

    @property
    def sampling(self) -> Path:
        """Stage 2: the guidance `vqgen eval --adopt` measured best for it, when adopted."""
        return self.path / "sampling.json"

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
    def vqvae(self) -> ModelDir:
        return ModelDir(self.root / "vqvae")

    @property
    def prior(self) -> ModelDir:
        return ModelDir(self.root / "prior")

    @property
    def codes(self) -> Path:
        return self.root / "codes"

    @property
    def codes_meta(self) -> Path:
        return self.codes / CODES_META

    @property
    def judge(self) -> ModelDir:
        """The small classifier `vqgen eval --samples` trains on the run's images to judge samples."""
        return ModelDir(self.root / "judge")

    @property
    def evaluations(self) -> Path:
        """One JSON line per `vqgen eval --samples`: settings and scores."""
        return self.root / "evaluations.jsonl"

    @property
    def closest_pairs(self) -> Path:
        """The samples of the newest `vqgen eval --samples` nearest to a training image, each beside it."""
        return self.root / "closest_pairs.png"

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

    @property
    def inpainted(self) -> Path:
        """`vqgen inpaint`'s default output."""
        return self.root / "inpainted.png"

    @property
    def outpainted(self) -> Path:
        """`vqgen outpaint`'s default output."""
        return self.root / "outpainted.png"

    @property
    def report(self) -> Path:
        """`vqgen report`'s default output, refreshed by training at each evaluation."""
        return self.root / "report.html"

    @property
    def model_card(self) -> Path:
        """An exported model's README.md."""
        return self.root / MODEL_CARD

    @property
    def sample_grid(self) -> Path:
        """An exported model's samples.png."""
        return self.root / SAMPLE_GRID

    @property
    def manifest(self) -> Path:
        """An exported model's manifest.json: the size and sha256 of every other file."""
        return self.root / MANIFEST

    def exported_files(self) -> list[Path]:
        """What an exported model carries from a run, where the run has it (the card, the picture and the
        manifest are written by the export itself)."""
        stages = [name for stage in (self.vqvae, self.prior) for name in (
            stage.config, stage.weights, stage.train_config, stage.metrics)]
        return [*stages, self.vqvae.data_config, self.prior.source, self.prior.sampling, self.codes_meta,
                self.evaluations]

    def newest_sample_grid(self) -> Path | None:
        """The grid.png of the highest-numbered sample set (an exported model's samples.png), None if none."""
        if self.sample_grid.is_file():
            return self.sample_grid
        sets = sorted(self.samples.glob("[0-9][0-9][0-9][0-9]")) if self.samples.is_dir() else []
        grids = [SampleSetDir(s).grid for s in sets if SampleSetDir(s).grid.is_file()]
        return grids[-1] if grids else None

    def next_samples_dir(self) -> Path:
        """samples/NNNN, one past the highest number taken."""
        taken = [int(p.name) for p in self.samples.glob("[0-9][0-9][0-9][0-9]")] if self.samples.is_dir() else []
        return self.samples / f"{max(taken, default=-1) + 1:04d}"


def model_outputs(name: str) -> RunLayout:
    """Where commands write what they make from a model that is not a run directory of this machine
    (an exported folder, a Hub download): outputs/NAME/ in the working directory, laid out like a run."""
    return RunLayout(Path(MODEL_OUTPUTS) / name)
