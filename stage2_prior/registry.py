"""The priors by name, and how a saved prior folder is read back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from stage2_prior.pixelcnn import PixelCNNConfig, PixelCNNPrior
from stage2_prior.transformer import TransformerConfig, TransformerPrior
from vqgen.core.checkpoint import CONFIG, WEIGHTS, load_weights
from vqgen.core.config import load_config, read_json
from vqgen.core.errors import VQGenError

PRIORS: dict[str, tuple[type, type[nn.Module]]] = {
    "transformer": (TransformerConfig, TransformerPrior),
    "pixelcnn": (PixelCNNConfig, PixelCNNPrior),
}
SOURCE = "source.json"


@dataclass(frozen=True)
class PriorSource:
    """Where a prior's training codes came from: checked again when it samples."""

    prior: str                  # "transformer" or "pixelcnn"
    vqvae_fingerprint: str
    codes_dir: str
    class_names: tuple[str, ...]


def prior_kind(cfg: Any) -> str:
    for kind, (config_cls, _) in PRIORS.items():
        if isinstance(cfg, config_cls):
            return kind
    raise TypeError(f"not a prior config: {type(cfg).__name__}")


def load_prior_config(folder: str | Path) -> Any:
    """The config in `folder/config.json`, whichever prior it describes."""
    path = Path(folder) / CONFIG
    kind = read_json(path, "prior config").get("kind")
    for config_cls, _ in PRIORS.values():
        if config_cls.__name__ == kind:
            return load_config(config_cls, path)
    raise VQGenError(f"{path} describes {kind!r}, not one of the priors {[c.__name__ for c, _ in PRIORS.values()]}")


def load_prior(folder: str | Path) -> tuple[nn.Module, PriorSource]:
    """Rebuild a trained prior and its source record from `folder`."""
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file():
        raise VQGenError(f"no trained prior in {folder} (run `python scripts/train_prior.py --run {folder.parent}`)")
    cfg = load_prior_config(folder)
    model = PRIORS[prior_kind(cfg)][1](cfg)
    load_weights(model, folder / WEIGHTS)
    return model.eval(), load_config(PriorSource, folder / SOURCE)
