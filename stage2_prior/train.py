"""Stage 2: fit an autoregressive prior over the dumped code grids with the shared loop."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from einops import rearrange
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from stage2_prior.registry import PRIORS, SOURCE, PriorSource, load_prior_config, prior_kind
from vqgen.core.checkpoint import check_stage_dir, clear_stage_dir, save_model, weights_fingerprint
from vqgen.core.codes import CodeSplit, CodesMeta, load_codes
from vqgen.core.config import resumed_config, save_config
from vqgen.core.console import make_console
from vqgen.core.errors import VQGenError
from vqgen.core.metrics import bits
from vqgen.core.trainer import TRAIN_CONFIG, TrainConfig, fit, make_accelerator, make_loader

PRIOR_DIR = "prior"
# Stage-2 training defaults, chosen by measurement (README, "Defaults"); any option overrides them.
TRAIN_DEFAULTS = dict(batch_size=32, learning_rate=1e-3, max_steps=1800, warmup_steps=100, eval_every=600,
                      save_every=600, weight_decay=0.01)


class CodesDataset(Dataset):
    """Items {"codes": (h, w) int64, "label": int64 (-1 when unlabelled), "index": int64}."""

    def __init__(self, split: CodeSplit, use_labels: bool):
        self.split, self.use_labels = split, use_labels

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[0] for k, v in self.batch([i]).items()}

    def batch(self, indices: list[int]) -> dict[str, Tensor]:
        """A whole batch by one indexing op (`vqgen.core.trainer.make_loader` uses it instead of n items)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        labels = self.split.labels[idx] if self.use_labels else torch.full_like(idx, -1)
        return {"codes": self.split.codes[idx], "label": labels, "index": idx}


def labels_of(batch: dict[str, Tensor], conditional: bool) -> Tensor | None:
    return batch["label"] if conditional else None


def grid_nll(prior: nn.Module, codes: Tensor, labels: Tensor | None) -> Tensor:
    """(b, h, w) codes -> (b,) negative log-likelihood of each grid in nats."""
    logits = prior(codes, labels)  # (b, h, w, k)
    nll = F.cross_entropy(rearrange(logits.float(), "b h w k -> b k h w"), codes, reduction="none")
    return nll.flatten(1).sum(1)


@dataclass
class PriorStage:
    """The stage-2 callbacks for `vqgen.core.trainer.fit`."""

    accelerator: Accelerator
    config: Any
    conditional: bool
    test_loader: DataLoader
    out_dir: Path
    name: str = "prior"

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        codes = batch["codes"]
        logits = model(codes, labels_of(batch, self.conditional))  # (b, h, w, k)
        loss = F.cross_entropy(rearrange(logits.float(), "b h w k -> (b h w) k"), codes.flatten())
        return loss, {"loss": loss.detach(), "bits_per_code": loss.detach() / math.log(2)}

    def window_metrics(self) -> dict[str, float]:
        return {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        model.eval()
        total = []
        for batch in self.test_loader:
            nll = grid_nll(model, batch["codes"], labels_of(batch, self.conditional))
            total.append(self.accelerator.gather_for_metrics(nll).cpu())
        per_grid = bits(torch.cat(total).mean().item())
        t = self.config.grid_height * self.config.grid_width
        return {"bits_per_code": per_grid / t, "bits_per_image": per_grid}

    def export(self, model: nn.Module) -> None:
        save_model(model, self.config, self.out_dir)


def check_codes_source(run_dir: Path, meta: CodesMeta, allow_mismatch: bool) -> None:
    """Refuse codes that another VQ-VAE produced than the run's own (unless overridden)."""
    vqvae_dir = run_dir / "vqvae"
    if not (vqvae_dir / "model.safetensors").is_file():
        if allow_mismatch:
            return
        raise VQGenError(f"{vqvae_dir} has no trained VQ-VAE to check the codes against "
                         "(train stage 1 first, or pass --allow-vqvae-mismatch)")
    own = weights_fingerprint(vqvae_dir)
    if own != meta.vqvae_fingerprint and not allow_mismatch:
        raise VQGenError(
            f"the codes were made by VQ-VAE {meta.vqvae_fingerprint} but {vqvae_dir} holds VQ-VAE {own} "
            "(re-run `vqgen encode`, or pass --allow-vqvae-mismatch)"
        )


def resolve_prior_config(kind: str, meta: CodesMeta, conditional: bool, overrides: dict[str, Any],
                         out_dir: Path, resume: bool) -> Any:
    """The prior config from the codes and options; on --resume the saved one, checked against the codes."""
    num_classes = meta.num_classes if conditional else 0
    from_codes = {"codebook_size": meta.codebook_size, "grid_height": meta.grid_height,
                  "grid_width": meta.grid_width, "num_classes": num_classes}
    if resume and (out_dir / "config.json").is_file():
        cfg = load_prior_config(out_dir)
        if prior_kind(cfg) != kind:
            raise VQGenError(f"--resume: {out_dir} holds a {prior_kind(cfg)} prior, not --prior {kind}")
        for name, value in {**from_codes, **overrides}.items():
            if getattr(cfg, name) != value:
                raise VQGenError(f"--resume: {name} is {value} here but the saved prior has {getattr(cfg, name)} "
                                 f"({out_dir / 'config.json'})")
        return cfg
    config_cls = PRIORS[kind][0]
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise VQGenError(f"options {unknown} do not apply to the {kind} prior")
    return config_cls(**{**from_codes, **overrides})


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
    """Train a `kind` prior on `run_dir/codes` (or `codes_dir`) into `run_dir/prior`.

    labels: "auto" (conditional when the codes have labels), "yes" (require them) or "no".
    """
    if kind not in PRIORS:
        raise VQGenError(f"--prior must be one of {sorted(PRIORS)}, got {kind!r}")
    run_dir = Path(run_dir)
    out_dir = run_dir / PRIOR_DIR
    splits, meta = load_codes(Path(codes_dir) if codes_dir else run_dir / "codes")
    check_codes_source(run_dir, meta, allow_vqvae_mismatch)
    if labels == "yes" and not meta.num_classes:
        raise VQGenError(f"--conditional: the codes in {codes_dir or run_dir / 'codes'} have no labels")
    conditional = bool(meta.num_classes) and labels != "no"
    for name in ("train", "test"):
        if name not in splits or len(splits[name]) == 0:
            raise VQGenError(f"the codes have no {name!r} grids ({codes_dir or run_dir / 'codes'})")
    check_stage_dir(out_dir, "prior", resume, overwrite)
    cfg = resolve_prior_config(kind, meta, conditional, model_overrides or {}, out_dir, resume)
    if len(splits["train"]) < train_cfg.batch_size:
        raise VQGenError(f"batch size {train_cfg.batch_size} is larger than the {len(splits['train'])} training grids")

    accelerator = make_accelerator(train_cfg, out_dir)
    console = make_console(accelerator.is_main_process)
    set_seed(train_cfg.seed)
    model = PRIORS[kind][1](cfg)
    n_params = sum(p.numel() for p in model.parameters())
    console.print(f"prior: {kind}, {n_params / 1e6:.2f}M parameters, K={cfg.codebook_size}, grid "
                  f"{cfg.grid_height}x{cfg.grid_width}, {'conditional on ' + str(cfg.num_classes) + ' classes' if conditional else 'unconditional'}")
    if accelerator.is_main_process:  # everything is validated: only now is anything written
        if overwrite and not resume:
            clear_stage_dir(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.json")
        save_config(PriorSource(prior=kind, vqvae_fingerprint=meta.vqvae_fingerprint,
                                codes_dir=str(Path(codes_dir or run_dir / "codes").resolve()),
                                class_names=meta.class_names if conditional else ()), out_dir / SOURCE)
    accelerator.wait_for_everyone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay)
    train_set = CodesDataset(splits["train"], conditional)
    train_loader = make_loader(train_set, train_cfg.batch_size, train=True, seed=train_cfg.seed)
    test_loader = accelerator.prepare(make_loader(CodesDataset(splits["test"], conditional), 256))
    stage = PriorStage(accelerator, cfg, conditional, test_loader, out_dir)
    return fit(accelerator, train_cfg, stage, model, optimizer, train_loader, out_dir, resume, console)


def train_from_options(run_dir: str | Path, kind: str, training: dict[str, Any], model: dict[str, Any],
                       **kwargs: Any) -> dict[str, float]:
    """What `scripts/train_prior.py` calls: defaults for a fresh prior, the saved options on --resume."""
    saved = Path(run_dir) / PRIOR_DIR / TRAIN_CONFIG
    if kwargs.get("resume") and saved.is_file():
        train_cfg = resumed_config(TrainConfig, saved, training, strict=False, what="")
    else:
        train_cfg = TrainConfig(**{**TRAIN_DEFAULTS, **training})
    return train_prior(run_dir, kind, train_cfg, model, **kwargs)
