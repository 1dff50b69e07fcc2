"""Stage 2: fit a prior (autoregressive or masked) over the dumped code grids with the shared loop."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader

from stage2_prior.contract import PriorConfig
from stage2_prior.registry import PriorKind, PriorSource, kind_of, load_prior_config, prior_kind
from vqgen.core.batches import BatchDataset, make_loader
from vqgen.core.checkpoint import check_stage_dir, weights_fingerprint
from vqgen.core.codes import CodeSplit, CodesMeta, load_codes, load_codes_meta
from vqgen.core.errors import VQGenError
from vqgen.core.layout import RunLayout, StageDir
from vqgen.core.lock import holds_stage_lock
from vqgen.core.stage import (check_batch_size, sized_batch, sized_model_options, sized_schedule, start,
                              steps_for_passes, train_config, write_stage_files)
from vqgen.core.trainer import TrainConfig, fit, make_optimizer

# Stage-2 training defaults, chosen by measurement (README, "Defaults"); any option overrides them.
TRAIN_DEFAULTS = dict(batch_size=32, learning_rate=1e-3, max_steps=1800, warmup_steps=100, eval_every=600,
                      save_every=600, weight_decay=0.1)


class CodesDataset(BatchDataset):
    """Items {"codes": (h, w) int64, "label": int64 (-1 when unlabelled), "index": int64}; the split's
    grids stay int16 and only a batch is widened."""

    def __init__(self, split: CodeSplit, use_labels: bool):
        self.split, self.use_labels = split, use_labels

    def __len__(self) -> int:
        return len(self.split)

    def batch(self, indices: list[int]) -> dict[str, Tensor]:
        """A whole batch by one indexing op."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        labels = self.split.labels[idx] if self.use_labels else torch.full_like(idx, -1)
        return {"codes": self.split.codes[idx].long(), "label": labels, "index": idx}


def labels_of(batch: dict[str, Tensor], conditional: bool) -> Tensor | None:
    return batch["label"] if conditional else None


@dataclass
class PriorStage:
    """The stage-2 callbacks for `vqgen.core.trainer.fit`; the loss and the held-out number are the prior
    kind's (`PriorKind.loss`, `.held_out`, `.metric`)."""

    accelerator: Accelerator
    config: PriorConfig
    conditional: bool
    test_loader: DataLoader
    name: str = "prior"

    @property
    def kind(self) -> PriorKind:
        return kind_of(self.config)

    @property
    def held_out(self) -> tuple[str, str]:
        return self.kind.metric, self.kind.metric

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return self.kind.loss(model, batch["codes"], labels_of(batch, self.conditional))

    def window_metrics(self) -> dict[str, float]:
        return {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        model.eval()
        batches = ((b["codes"], labels_of(b, self.conditional), b["index"]) for b in self.test_loader)
        return self.kind.held_out(model, self.config, batches, self.accelerator.gather_for_metrics)


def check_codes_source(run: RunLayout, meta: CodesMeta, allow_mismatch: bool) -> None:
    """Refuse codes that another VQ-VAE produced than the run's own (unless overridden)."""
    if not run.vqvae.trained:
        if allow_mismatch:
            return
        raise VQGenError(f"{run.vqvae.path} has no trained VQ-VAE to check the codes against "
                         "(train stage 1 first, or pass --allow-vqvae-mismatch)")
    own = weights_fingerprint(run.vqvae.path)
    if own != meta.vqvae_fingerprint and not allow_mismatch:
        raise VQGenError(
            f"the codes were made by VQ-VAE {meta.vqvae_fingerprint} but {run.vqvae.path} holds VQ-VAE {own} "
            "(re-run `vqgen encode`, or pass --allow-vqvae-mismatch)"
        )


def resolve_prior_config(kind: str, meta: CodesMeta, conditional: bool, overrides: dict[str, Any],
                         stage: StageDir, resume: bool) -> PriorConfig:
    """The prior config from the codes and options; on resume the saved one, checked against the codes."""
    num_classes = meta.num_classes if conditional else 0
    from_codes = {"codebook_size": meta.codebook_size, "grid_height": meta.grid_height,
                  "grid_width": meta.grid_width, "num_classes": num_classes}
    if resume and stage.config.is_file():
        cfg = load_prior_config(stage)
        if kind_of(cfg).name != kind:
            raise VQGenError(f"cannot resume: {stage.path} holds a {kind_of(cfg).name} prior, not a {kind} prior")
        for name, value in {**from_codes, **overrides}.items():
            if getattr(cfg, name) != value:
                raise VQGenError(f"cannot resume: {name} is {value} here but the saved prior has "
                                 f"{getattr(cfg, name)} ({stage.config})")
        return cfg
    config_cls = prior_kind(kind).config
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise VQGenError(f"options {unknown} do not apply to the {kind} prior")
    return config_cls(**{**from_codes, **overrides})


@holds_stage_lock("prior")  # one writer per stage folder: a second run is refused
def train_prior(
    run_dir: str | Path,
    kind: str,
    train_cfg: TrainConfig,
    model_overrides: dict[str, Any] | None = None,
    codes_dir: str | Path | None = None,
    labels: str = "auto",
    resume: bool = False,
    allow_vqvae_mismatch: bool = False,
    overwrite: bool = False,
) -> dict[str, float]:
    """Train a `kind` prior on the run's codes (or `codes_dir`) into the run's prior folder.

    labels: "auto" (conditional when the codes have labels), "yes" (require them) or "no".
    """
    prior_kind(kind)
    run = RunLayout(run_dir)
    stage = run.prior
    codes_dir = Path(codes_dir) if codes_dir else run.codes
    splits, meta = load_codes(codes_dir)
    check_codes_source(run, meta, allow_vqvae_mismatch)
    if labels == "yes" and not meta.num_classes:
        raise VQGenError(f"conditional training asked for, but the codes in {codes_dir} have no labels")
    conditional = bool(meta.num_classes) and labels != "no"
    for name in ("train", "test"):
        if name not in splits or len(splits[name]) == 0:
            raise VQGenError(f"the codes have no {name!r} grids ({codes_dir})")
    check_stage_dir(stage, "prior", resume, overwrite)
    cfg = resolve_prior_config(kind, meta, conditional, model_overrides or {}, stage, resume)
    check_batch_size(train_cfg.batch_size, len(splits["train"]), "training grids")

    accelerator, console = start(stage, train_cfg)
    model = prior_kind(kind).model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    console.print(f"prior: {kind}, {n_params / 1e6:.2f}M parameters, K={cfg.codebook_size}, grid "
                  f"{cfg.grid_height}x{cfg.grid_width}, "
                  f"{'conditional on ' + str(cfg.num_classes) + ' classes' if conditional else 'unconditional'}")
    frequencies = ()
    if conditional:
        counts = torch.bincount(splits["train"].labels, minlength=meta.num_classes).double()
        frequencies = tuple((counts / counts.sum()).tolist())
    source = PriorSource(prior=kind, vqvae_fingerprint=meta.vqvae_fingerprint, codes_dir=str(codes_dir.resolve()),
                         class_names=meta.class_names if conditional else (), class_frequencies=frequencies,
                         pseudo_labels=conditional and meta.pseudo_labels)
    write_stage_files(accelerator, stage, {stage.config: cfg, stage.source: source}, fresh=overwrite and not resume)
    optimizer = make_optimizer(model, train_cfg)
    train_set = CodesDataset(splits["train"], conditional)
    train_loader = make_loader(train_set, train_cfg.batch_size, train=True, seed=train_cfg.seed,
                               num_workers=train_cfg.num_workers)
    test_loader = accelerator.prepare(make_loader(CodesDataset(splits["test"], conditional), 256))
    prior_stage = PriorStage(accelerator, cfg, conditional, test_loader)
    return fit(accelerator, train_cfg, prior_stage, model, optimizer, train_loader, stage, resume, console)


def sized_defaults(meta: CodesMeta, given_training: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stage-2 defaults from the codes (README, "Defaults sized to the data"): model options, training options.

    Regularisation by the number of training codes (grids x codes per grid): dropout 0.3 under 500k
    codes, 0.1 under 5M, none above. Length: 40 passes over the grids, 2,000 to 8,000 steps, evaluated
    20 times, so that early stopping (patience 5) ends a run that has started to memorise. Batch: all
    the training grids when they are fewer than the default batch.
    """
    grids = dict(meta.split_sizes).get("train", 0)
    codes = grids * meta.grid_height * meta.grid_width
    model = {"dropout": 0.3 if codes < 500_000 else 0.1 if codes < 5_000_000 else 0.0}
    small = sized_batch(given_training, TRAIN_DEFAULTS["batch_size"], grids)
    batch = {**TRAIN_DEFAULTS, **small, **given_training}["batch_size"]  # the batch the run will use
    steps = steps_for_passes(grids, batch, passes=40, lowest=2000, highest=8000)
    training = {**sized_schedule(given_training, steps, evaluations=20), **small}
    return model, training


def train_from_options(run_dir: str | Path, kind: str, training: dict[str, Any], model: dict[str, Any],
                       **kwargs: Any) -> dict[str, float]:
    """What `scripts/train_prior.py` calls: defaults sized to the codes for a fresh prior, the saved
    options on resume."""
    run = RunLayout(run_dir)
    resume = kwargs.get("resume", False)
    meta = load_codes_meta(Path(kwargs.get("codes_dir") or run.codes))
    sized_model, sized_training = sized_defaults(meta, training)
    train_cfg = train_config(run.prior, training, {**TRAIN_DEFAULTS, **sized_training}, resume)
    model = sized_model_options(model, training, sized_model, sized_training, resume)
    return train_prior(run_dir, kind, train_cfg, model, **kwargs)
