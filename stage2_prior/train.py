"""Stage 2: fit a prior (autoregressive or masked) over the dumped code grids with the shared loop."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader

from stage2_prior.config import TRAIN_DEFAULTS, PriorConfig
from stage2_prior.registry import PriorKind, PriorSource, kind_of, load_prior_config, prior_kind
from vqgen.core.data.loaders import BatchDataset, make_loader
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.runtime.processes import process_state
from vqgen.core.store.codes import CodesMeta, CodeSplit, load_codes, load_codes_meta
from vqgen.core.store.layout import ModelDir, RunLayout
from vqgen.core.store.lock import holds_stage_lock
from vqgen.core.store.weights import check_stage_dir, weights_fingerprint
from vqgen.core.training.config import TrainConfig
from vqgen.core.training.loop import fit, make_optimizer
from vqgen.core.training.setup import as_options, check_batch_size, start, train_config, write_stage_files
from vqgen.core.training.sizing import EVAL_SHARE, report_sized, sized_batch, sized_schedule, steps_for_passes

DEFAULT_KIND = "transformer"  # a fresh prior's kind when none is given


class CodesDataset(BatchDataset):
    """Items {"codes": (h, w) int64, "label": int64 (-1 when unlabelled), "index": int64}; the split's
    grids stay int16 and only a batch is widened."""

    def __init__(self, split: CodeSplit, use_labels: bool):
        self.split, self.use_labels = split, use_labels
        self.conditions = split.condition_ids

    def __len__(self) -> int:
        return len(self.split)

    def batch(self, indices: list[int]) -> dict[str, Tensor]:
        """A whole batch by one indexing op."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        labels = self.conditions[idx] if self.use_labels else torch.full_like(idx, -1)
        return {"codes": self.split.codes[idx].long(), "label": labels, "index": idx}


def labels_of(batch: dict[str, Tensor], conditional: bool) -> Tensor | None:
    return batch["label"] if conditional else None


@dataclass
class PriorTask:
    """What the shared loop (`vqgen.core.training.loop.fit`) trains in stage 2: the loss and the test evaluation,
    which are the prior kind's (`PriorKind.loss`, `.held_out`, `.metric`)."""

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
        return self.kind.loss(model, batch["codes"], labels_of(batch, self.conditional), self.config.label_smoothing)

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


def resolve_prior_config(kind: str | None, meta: CodesMeta, conditional: bool, overrides: dict[str, Any],
                         stage: ModelDir, resume: bool) -> PriorConfig:
    """The prior config from the codes and options; on resume the saved one, checked against the codes (and
    against `kind` when given). A fresh prior of no given kind is a Transformer."""
    num_classes = meta.num_conditions if conditional else 0
    from_codes = {"codebook_size": meta.codebook_size, "grid_height": meta.grid_height,
                  "grid_width": meta.grid_width, "num_classes": num_classes}
    if resume and stage.config.is_file():
        cfg = load_prior_config(stage)
        if kind is not None and kind_of(cfg).name != kind:
            raise VQGenError(f"cannot resume: {stage.path} holds a {kind_of(cfg).name} prior, not a {kind} prior")
        for name, value in {**from_codes, **overrides}.items():
            if getattr(cfg, name) != value:
                raise VQGenError(f"cannot resume: {name} is {value} here but the saved prior has "
                                 f"{getattr(cfg, name)} ({stage.config})")
        return cfg
    kind = kind or DEFAULT_KIND
    config_cls = prior_kind(kind).config
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise VQGenError(f"options {unknown} do not apply to the {kind} prior")
    return config_cls(**{**from_codes, **overrides})


# Too few passes to memorise: a prior planned for fewer passes over its training grids gets no dropout, whatever
# their number (docs/defaults.md, "Dropout"): on MNIST at 1,500 x 64 (1.6 passes) dropout 0.1 cost 2.148 against
# 2.054 test bits per code, on the shapes at the quickstart's 1,800 x 32 (5.8 passes) 2.76 against 2.52.
FEW_PASSES = 10
# Little data: under this many training codes (grids x codes per grid) a raster prior trains for twice the passes
# with a tenth of its input codes replaced by random ones (docs/benchmarks.md, "Regularising the prior on little
# data"): on OpenMoji 32 px (142k codes) the samples' FID 2.39 -> 1.94 and class accuracy 0.33 -> 0.41, against
# 2.37 and 0.34 for the longer training alone, which memorises and stops early. The masked prior, which hides
# codes as its objective, keeps the default: with both, its FID on the same codes went 2.16 -> 3.36 (either one
# alone: 2.23, 2.35).
FEW_CODES = 500_000
# Little data, deeper: there a Transformer prior has 8 blocks instead of 4 (docs/benchmarks.md, "The prior's depth
# on a small folder"). At --cfg 1.5 the samples' FID on OpenMoji 32 px went 1.94 -> 1.73, on 2,000 shapes 6.80 ->
# 4.64 (class accuracy 0.49 -> 0.66), on 2,000 MNIST digits 0.472 -> 0.554 (class accuracy 0.93 -> 0.94); with
# each run's guidance adopted by `vqgen eval --adopt`, lower on all three (1.43 -> 1.38, 5.58 -> 3.77, 0.472 ->
# 0.446). It costs 1.9x the training and 2x the sampling time; 64-wide blocks were worse on both datasets tried,
# and so was a masked prior of 8 blocks (OpenMoji 32 px 2.16 -> 2.69, 2,000 shapes 10.29 -> 12.20). 12 blocks
# memorise sooner: OpenMoji 32 px 2.23 (1.63 adopted). Above the threshold 8 blocks did not help the same folder
# at 64 px (568k codes: 0.910 against 0.901), so the rule counts codes, not images.
LITTLE_DATA_LAYERS = 8
# Little data, the class in every block: there a Transformer prior conditioned on classes or on clusters of codes
# (not on clusters within classes: worse, below) also scales and shifts each block's normalised inputs by the class
# (`class_modulation`, docs/benchmarks.md, "The class in every block"; on clusters, "... on clusters, and at 64 px").
# On 2,000 shapes the samples' FID went 4.64 -> 2.26 at --cfg 1.5 (class accuracy 0.66 -> 0.85), on 2,000 MNIST digits
# 0.554 -> 0.471 (0.94 -> 0.95); on OpenMoji 32 px class accuracy 0.41 -> 0.49 while the FID rose 1.73 -> 1.87
# (adopted: 1.38 -> 1.70, class accuracy 0.38 -> 0.51). A table of shifts and scales per class overfits sooner.
# A masked prior takes it too, and nothing else of the rule: its held-out bits per masked code fell on all three
# datasets, its FID at --cfg 1.5 went 2.15 -> 1.45 (2,000 MNIST digits) and 10.29 -> 9.31 (2,000 shapes) and rose
# 2.16 -> 2.84 on OpenMoji 32 px, with class accuracy up on all three (0.72 -> 0.83, 0.25 -> 0.38, 0.42 -> 0.49).
# On clusters of codes its kept FID went 1.77 -> 1.25 (2,000 MNIST digits) and 1.78 -> 1.28 (OpenMoji 32 px), and
# 12.07 -> 12.93 on 2,000 shapes, level at --cfg 1.5 ("The masked prior on clusters").


def sized_dropout(codes: int, passes: float) -> float:
    """Dropout for `codes` training codes (grids x codes per grid) seen `passes` times: none below FEW_PASSES
    planned passes, else 0.3 under FEW_CODES codes, 0.1 under 5M, none above."""
    if passes < FEW_PASSES:
        return 0.0
    return 0.3 if codes < FEW_CODES else 0.1 if codes < 5_000_000 else 0.0


PRIOR_STEPS = (2000, 8000)  # the sized length's bounds


def little_data(codes: int) -> bool:
    """Whether the little-data rule applies: under FEW_CODES training codes (each rule says which kinds it sizes)."""
    return codes < FEW_CODES


def planned_passes(meta: CodesMeta, max_steps: int, batch: int, processes: int, epochs: int) -> float:
    """Passes over the training images a run plans: `max_steps` batches on each of `processes`, else `epochs`
    over all the grids, in which each image comes 1 + its augmented copies times."""
    if max_steps:
        return max_steps * batch * processes / max(meta.distinct_train_grids, 1)
    return epochs * (1 + meta.train_copies)


def sized_passes(codes: int, raster: bool = True) -> int:
    """Passes over the training grids that a prior of `codes` training codes plans: 80 for a raster prior
    (`PriorKind.raster`) under the little-data rule, else 40."""
    return 80 if raster and little_data(codes) else 40


def sized_model(codes: int, passes: float, kind: str = DEFAULT_KIND,
                conditional: bool = False) -> dict[str, float | int | bool]:
    """The model options sized for `codes` training codes seen `passes` times by a `kind` prior: dropout
    (`sized_dropout`), and under the little-data rule with at least FEW_PASSES planned passes also code dropout
    0.1 and, for a Transformer, LITTLE_DATA_LAYERS blocks; there a conditional Transformer or masked prior also
    has the class modulation (the masked prior nothing else)."""
    dropout = {"dropout": sized_dropout(codes, passes)}
    if not little_data(codes) or passes < FEW_PASSES:
        return dropout
    by_class = {"class_modulation": True} if conditional else {}
    if not prior_kind(kind).raster:  # the masked prior keeps its length, size and input codes
        return {**dropout, **by_class}
    deeper = {"n_layers": LITTLE_DATA_LAYERS, **by_class}
    return {**dropout, "code_dropout": 0.1, **(deeper if kind == "transformer" else {})}


def sized_defaults(meta: CodesMeta, given_training: dict[str, Any], processes: int = 1,
                   kind: str = DEFAULT_KIND, conditional: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stage-2 defaults from the codes (docs/defaults.md) for a `kind` prior: model options, training options.

    Length: 40 passes over the grids (80 under the little-data rule), 2,000 to 8,000 steps, evaluated 20 times,
    so that early stopping (patience 5) ends a run that has started to memorise, or fewer times where
    evaluating the test grids that often would cost more than EVAL_SHARE of the training (`sized_schedule`).
    Batch: all the training grids when they are fewer than the default batch. Regularisation and depth by the
    number of training codes and the passes the run plans over them, given length and batch included, each of
    the `processes` drawing its own batch, and whether the prior is `conditional` on the data's classes or on
    clusters of codes alone, not on clusters within classes (`sized_model`).
    """
    # one grid per training image: augmented copies (--code-copies) add variety, not images, so they change neither
    # the length in passes nor the rules; the batch is drawn from every grid
    grids, codes = meta.distinct_train_grids, meta.distinct_train_codes
    small = sized_batch(given_training, TRAIN_DEFAULTS["batch_size"], dict(meta.split_sizes).get("train", 0))
    batch = {**TRAIN_DEFAULTS, **small, **given_training}["batch_size"]  # the batch the run will use
    steps = steps_for_passes(grids, batch, sized_passes(codes, prior_kind(kind).raster), *PRIOR_STEPS)
    training = {**sized_schedule(given_training, steps, evaluations=20, batch=batch * processes,
                                 held_out=dict(meta.split_sizes).get("test", 0)), **small}
    planned = training["max_steps"]  # 0: --epochs passes
    passes = planned_passes(meta, planned, batch, processes, given_training.get("epochs", TrainConfig().epochs))
    # classes, or clusters of codes alone (better on all three datasets, or level on the shapes for the masked prior);
    # clusters within classes keep the start token: in every block their kept FID was 0.951 against 0.397 (2,000 MNIST
    # digits, the default guidance copying) and 1.99 against 1.70 (OpenMoji 32 px; docs/benchmarks.md, "Clusters
    # within classes, with the class in every block")
    by_class = conditional and not meta.condition_classes
    return sized_model(codes, passes, kind, by_class), training


def conditioned_on(meta: CodesMeta) -> str:
    if meta.condition_classes:
        return f"conditional on {len(meta.condition_classes)} clusters within {meta.num_classes} classes"
    return f"conditional on {meta.num_classes} {'clusters' if meta.pseudo_labels else 'classes'}"


def condition_shares(train: CodeSplit, meta: CodesMeta) -> dict[str, tuple]:
    """PriorSource's record of what the prior conditions on: each class's share of the training grids and,
    for clusters within classes, each cluster's class and its share of that class's grids."""
    counts = torch.bincount(train.labels, minlength=meta.num_classes).double()
    shares = {"class_frequencies": tuple((counts / counts.sum()).tolist())}
    if meta.condition_classes:
        owners = torch.tensor(meta.condition_classes)
        within = torch.bincount(train.conditions, minlength=len(owners)).double() / counts[owners].clamp_min(1)
        shares.update(condition_classes=meta.condition_classes, condition_frequencies=tuple(within.tolist()))
    return shares


@holds_stage_lock("prior")  # one writer per stage folder: a second run is refused
def train_prior(
    run_dir: str | Path,
    kind: str | None = None,
    training: TrainConfig | dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    *,
    codes_dir: str | Path | None = None,
    labels: str = "auto",
    resume: bool = False,
    allow_vqvae_mismatch: bool = False,
    overwrite: bool = False,
) -> dict[str, float]:
    """Stage 2's one entry point (`vqgen train prior`, scripts/train_prior.py, the tests): fit a `kind` prior on
    the run's code grids (or `codes_dir`) into RUN/prior. Returns the best evaluation's metrics. kind: None
    for the saved prior's kind on resume, a Transformer otherwise.

    `training`, `model`: the options given, as a dict of config fields or a whole config (all of whose fields
    count as given). A fresh prior fills the others with the defaults sized to the codes; a resumed one takes
    them from its saved configs and refuses a model option that differs. labels: "auto" (conditional when
    the codes have labels), "yes" (require them) or "no". Everything is checked before the grids are read.
    """
    if kind is not None:
        prior_kind(kind)
    run = RunLayout(run_dir)
    stage = run.prior
    codes_dir = Path(codes_dir) if codes_dir else run.codes
    meta = load_codes_meta(codes_dir)
    check_codes_source(run, meta, allow_vqvae_mismatch)
    if labels == "yes" and not meta.num_classes:
        raise VQGenError(f"conditional training asked for, but the codes in {codes_dir} have no labels")
    conditional = bool(meta.num_classes) and labels != "no"
    sizes = dict(meta.split_sizes)
    for name in ("train", "test"):
        if not sizes.get(name):
            raise VQGenError(f"the codes have no {name!r} grids ({codes_dir})")
    check_stage_dir(stage, "prior", resume, overwrite)
    given_training, given_model = as_options(training), as_options(model)
    processes = process_state().num_processes
    raster = prior_kind(kind or DEFAULT_KIND).raster  # a resumed prior's kind sizes nothing
    sized_options, sized_training = ({}, {}) if resume else sized_defaults(meta, given_training, processes,
                                                                             kind or DEFAULT_KIND, conditional)
    train_cfg = train_config(stage, given_training, {**TRAIN_DEFAULTS, **sized_training}, resume)
    cfg = resolve_prior_config(kind, meta, conditional, {**sized_options, **given_model}, stage, resume)
    passes = planned_passes(meta, train_cfg.max_steps, train_cfg.batch_size, processes, train_cfg.epochs)
    over = f"{meta.distinct_train_grids} training grids" + (
        f" (and {meta.train_copies} augmented copies of each)" if meta.train_copies else "")
    train_codes = meta.distinct_train_codes  # what the rules count (`sized_defaults`)
    few_codes = f"{train_codes} training codes, fewer than {FEW_CODES}"  # why the little-data rule sized them
    report_sized(sized_options, sized_training, {**given_model, **given_training}, resume,
                 why={"dropout": f"{passes:.1f} planned passes over {over}, "
                                 f"{'fewer than' if passes < FEW_PASSES else 'at least'} {FEW_PASSES}",
                      "code_dropout": few_codes, "n_layers": few_codes,
                      "class_modulation": f"{few_codes}; off with --no-class-modulation",
                      "max_steps": f"{sized_passes(train_codes, raster)} passes over {over}, "
                                   f"within {PRIOR_STEPS[0]}-{PRIOR_STEPS[1]}",
                      "eval_every": f"{sizes['test']} test grids, at most {EVAL_SHARE:.0%} of the training"})
    check_batch_size(train_cfg.batch_size, sizes["train"], "training grids")
    splits, _ = load_codes(codes_dir)

    accelerator, console = start(stage, train_cfg)
    kind = kind_of(cfg).name
    prior = prior_kind(kind).model(cfg)
    n_params = sum(p.numel() for p in prior.parameters())
    console.print(f"prior: {kind}, {n_params / 1e6:.2f}M parameters, K={cfg.codebook_size}, grid "
                  f"{cfg.grid_height}x{cfg.grid_width}, "
                  f"{conditioned_on(meta) if conditional else 'unconditional'}")
    source = PriorSource(prior=kind, vqvae_fingerprint=meta.vqvae_fingerprint, codes_dir=str(codes_dir.resolve()),
                         class_names=meta.class_names if conditional else (),
                         pseudo_labels=conditional and meta.pseudo_labels,
                         **(condition_shares(splits["train"], meta) if conditional else {}))
    write_stage_files(accelerator, stage, {stage.config: cfg, stage.source: source}, fresh=overwrite and not resume)
    optimizer = make_optimizer(prior, train_cfg)
    train_loader = make_loader(CodesDataset(splits["train"], conditional), train_cfg.batch_size, train=True,
                               seed=train_cfg.seed, num_workers=train_cfg.num_workers)
    test_loader = accelerator.prepare(make_loader(CodesDataset(splits["test"], conditional), 256))
    task = PriorTask(accelerator, cfg, conditional, test_loader)
    return fit(accelerator, train_cfg, task, prior, optimizer, train_loader, stage, resume, console)
