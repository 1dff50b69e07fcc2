"""The priors by name, and how a saved prior folder is read back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from stage2_prior.config import CFG_SCHEDULES, PRIOR_CONFIGS, PriorConfig
from stage2_prior.masked import MaskedPrior, masked_held_out, masked_loss
from stage2_prior.pixelcnn import PixelCNNPrior
from stage2_prior.raster import raster_held_out, raster_loss
from stage2_prior.sampling import seeded_choice
from stage2_prior.transformer import TransformerPrior
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store.configs import load_config, option, read_json
from vqgen.core.store.layout import ModelDir
from vqgen.core.store.weights import load_weights

CLUSTER_STREAM = 3 << 60  # a cluster within a class drawn for a sample: its own generator, apart from the codes'

# (model, codes (b, h, w), labels (b,) or None, label smoothing) -> (loss, detached scalars for the training
# log); the model may be wrapped (DDP), so the function calls nothing but its `forward`.
LossFn = Callable[[nn.Module, Tensor, Tensor | None, float], tuple[Tensor, dict[str, Tensor]]]
# (model, its config, test batches (codes, labels or None, index in the split), gather across processes)
# -> test metrics, `PriorKind.metric` among them.
HeldOutFn = Callable[[nn.Module, PriorConfig, Iterable[tuple[Tensor, Tensor | None, Tensor]],
                      Callable[[Tensor], Tensor]], dict[str, float]]


@dataclass(frozen=True)
class PriorKind:
    """One prior: its name on the command line, its config and model, how it trains and which held-out
    number (lower is better, logged under the same name in training) picks its best weights."""

    name: str
    config: type[PriorConfig]
    model: type[nn.Module]
    loss: LossFn
    held_out: HeldOutFn
    metric: str
    raster: bool  # sampled code by code in raster order (`sample_codes`); else by `fill_masked`


def _kind(name: str, model: type[nn.Module], raster: bool) -> PriorKind:
    if raster:
        return PriorKind(name, PRIOR_CONFIGS[name], model, raster_loss, raster_held_out, "bits_per_code", True)
    return PriorKind(name, PRIOR_CONFIGS[name], model, masked_loss, masked_held_out, "bits_per_masked_code", False)


PRIORS: dict[str, PriorKind] = {p.name: p for p in (
    _kind("transformer", TransformerPrior, raster=True),
    _kind("pixelcnn", PixelCNNPrior, raster=True),
    _kind("masked", MaskedPrior, raster=False),
)}
assert set(PRIORS) == set(PRIOR_CONFIGS), "every prior kind the options name has a model"


@dataclass(frozen=True)
class PriorSource:
    """Where a prior's training codes came from: checked again when it samples."""

    prior: str                  # a name in PRIORS: "transformer", "pixelcnn" or "masked"
    vqvae_fingerprint: str
    codes_dir: str
    class_names: tuple[str, ...]
    class_frequencies: tuple[float, ...] = option((), "share of the training grids in each class", since=2)
    pseudo_labels: bool = option(False, "the classes are clusters of the codes (unlabelled data)", since=2)
    condition_classes: tuple[int, ...] = option(
        (), "the prior conditions on clusters within classes: the class of each (none: on the classes)", since=6)
    condition_frequencies: tuple[float, ...] = option(
        (), "each cluster within a class: its share of its class's training grids", since=6)

    def conditions(self, labels: Tensor | None, seeds: Tensor) -> Tensor | None:
        """(b,) class ids (the null class `len(class_names)` allowed), (b,) sample seeds -> (b,) what the prior
        conditions on: the classes themselves, or for each sample a cluster within its class, drawn with the
        clusters' shares of that class from its seed alone (the null class stays null)."""
        if labels is None or not self.condition_classes:
            return labels
        classes = len(self.class_names)
        bad = labels[(labels < 0) | (labels > classes)]
        if len(bad):
            raise VQGenError(f"labels must be in [0, {classes}] ({classes} = null class), got {int(bad[0])}")
        owners = torch.tensor(self.condition_classes, device=labels.device)
        mine = (owners[None, :] == labels[:, None]).double()  # (b, conditions): the clusters of each label's class
        weights = mine * torch.tensor(self.condition_frequencies, dtype=torch.double, device=labels.device)
        weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, mine)  # a class no training grid had
        drawn = seeded_choice(weights, seeds + CLUSTER_STREAM)
        return torch.where(labels == classes, len(owners), drawn)


@dataclass(frozen=True)
class AdoptedGuidance:
    """The guidance `vqgen eval --adopt` measured best for a prior (prior/sampling.json): what it samples with where
    a command names none, as long as its weights are those it was measured on."""

    cfg_scale: float = option(help="classifier-free guidance scale")
    cfg_schedule: str = option(help="how the scale runs over a sample's draws", choices=CFG_SCHEDULES)
    prior_weights: str = option(help="fingerprint of the prior's weights it was measured on")
    measured: str = option("", help="what it was chosen by, in words")


def load_adopted(stage: ModelDir) -> AdoptedGuidance | None:
    """The prior's adopted guidance, None when it has none."""
    return load_config(AdoptedGuidance, stage.sampling) if stage.sampling.is_file() else None


def prior_kind(name: str) -> PriorKind:
    if name not in PRIORS:
        raise VQGenError(f"prior must be one of {sorted(PRIORS)}, got {name!r}")
    return PRIORS[name]


def kind_of(cfg: PriorConfig) -> PriorKind:
    """The registered prior a config belongs to."""
    for kind in PRIORS.values():
        if type(cfg) is kind.config:
            return kind
    raise TypeError(f"not a prior config: {type(cfg).__name__}")


def load_prior_config(stage: ModelDir) -> PriorConfig:
    """The config in the stage's config.json, whichever prior it describes."""
    name = read_json(stage.config, "prior config").get("kind")
    for kind in PRIORS.values():
        if kind.config.__name__ == name:
            return load_config(kind.config, stage.config)
    raise VQGenError(f"{stage.config} describes {name!r}, not one of the priors "
                     f"{[k.config.__name__ for k in PRIORS.values()]}")


def load_prior(stage: ModelDir) -> tuple[nn.Module, PriorSource]:
    """Rebuild a trained prior and its source record from its stage folder."""
    if not stage.trained:
        raise VQGenError(f"no trained prior in {stage.path} "
                         f"(run `python scripts/train_prior.py --run {stage.path.parent}`)")
    cfg = load_prior_config(stage)
    model = kind_of(cfg).model(cfg)
    load_weights(model, stage.weights)
    return model.eval(), load_config(PriorSource, stage.source)
