"""Stage 1: train the VQ-VAE with the shared loop, then dump the dataset's code grids."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn
from torch.utils.data import DataLoader

from stage1_vqvae.encode import encode_splits
from stage1_vqvae.model import VQVAE, VQVAEConfig
from vqgen.core.checkpoint import check_stage_dir, clear_stage_dir, save_model
from vqgen.core.config import resumed_config, save_config
from vqgen.core.console import make_console
from vqgen.core.data.images import DataConfig, ImageData, ImageDataset, load_image_data, to_model_range, to_uint8
from vqgen.core.imageio import save_grid
from vqgen.core.errors import VQGenError
from vqgen.core.metrics import code_usage, psnr
from vqgen.core.trainer import TRAIN_CONFIG, TrainConfig, fit, make_accelerator, make_loader

VQVAE_DIR = "vqvae"
DATA_CONFIG = "data_config.json"
# Stage-1 training defaults, chosen by measurement (README, "Defaults"); any option overrides them.
TRAIN_DEFAULTS = dict(batch_size=64, learning_rate=1e-3, max_steps=1000, warmup_steps=100, eval_every=500,
                      save_every=500)


def reconstruction_errors(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """(b, c, H, W) in [-1, 1] -> per-image MSE on [0, 1] pixels (b,), and the codes (b, h, w)."""
    out = model(images)
    recon = out.recon.float().clamp(-1, 1)
    mse = ((recon - images.float()) / 2).pow(2).flatten(1).mean(1)
    return mse, out.quant.indices


@dataclass
class VQVAEStage:
    """The stage-1 callbacks for `vqgen.core.trainer.fit`."""

    accelerator: Accelerator
    config: VQVAEConfig
    test_loader: DataLoader
    out_dir: Path
    preview: Tensor               # (16, c, H, W) test images for the reconstruction grid
    name: str = "vqvae"

    def __post_init__(self):
        self._counts = torch.zeros(self.config.codebook_size, dtype=torch.long)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        images = batch["image"].contiguous(memory_format=torch.channels_last)
        out = model(images)
        self._counts += out.quant.counts.detach().cpu()  # already summed over processes
        logs = {
            "loss": out.loss.detach(),
            "recon_mse": out.recon_loss.detach() / 4,  # [-1, 1] -> [0, 1] pixels
            "commitment": out.quant.commitment_loss.detach(),
            "codebook": out.quant.codebook_loss.detach(),
        }
        return out.loss, logs

    def window_metrics(self) -> dict[str, float]:
        usage = code_usage(self._counts)
        self._counts.zero_()
        return usage

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        model.eval()
        errors, codes = [], []
        for batch in self.test_loader:
            mse, indices = reconstruction_errors(model, batch["image"])
            mse, indices = self.accelerator.gather_for_metrics((mse, indices))
            errors.append(mse.cpu())
            codes.append(indices.cpu())
        mse = torch.cat(errors).mean().item()
        counts = torch.bincount(torch.cat(codes).flatten(), minlength=self.config.codebook_size)
        if self.accelerator.is_main_process:
            recon = self.accelerator.unwrap_model(model)(self.preview.to(self.accelerator.device)).recon
            pair = torch.cat([to_uint8(self.preview), to_uint8(recon.float().cpu())])
            save_grid(pair, self.out_dir / "reconstructions" / f"step-{step:07d}.png", nrow=len(self.preview))
        return {"mse": mse, "psnr": psnr(mse), **code_usage(counts)}

    def export(self, model: nn.Module) -> None:
        save_model(model, self.config, self.out_dir)


def resolve_config(run_dir: Path, overrides: dict[str, Any], data: ImageData, resume: bool) -> VQVAEConfig:
    """The model config: from the data and the options, or on --resume from the run, refusing conflicts."""
    saved_path = run_dir / VQVAE_DIR / "config.json"
    if resume and saved_path.is_file():
        cfg = resumed_config(VQVAEConfig, saved_path, overrides, strict=True, what="model options")
    else:
        cfg = VQVAEConfig(**{"in_channels": data.channels, "image_height": data.height,
                             "image_width": data.width, **overrides})
    if (cfg.in_channels, cfg.image_height, cfg.image_width) != (data.channels, data.height, data.width):
        raise VQGenError(
            f"the data has {data.channels}x{data.height}x{data.width} images but the VQ-VAE expects "
            f"{cfg.in_channels}x{cfg.image_height}x{cfg.image_width}"
        )
    return cfg


def train_vqvae(
    run_dir: str | Path,
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    model_overrides: dict[str, Any] | None = None,
    resume: bool = False,
    encode: bool = True,
    overwrite: bool = False,
) -> dict[str, float]:
    """Train stage 1 into `run_dir/vqvae`, then (by default) encode every split to `run_dir/codes`."""
    run_dir = Path(run_dir)
    out_dir = run_dir / VQVAE_DIR
    check_stage_dir(out_dir, "VQ-VAE", resume, overwrite)
    if resume and (out_dir / DATA_CONFIG).is_file():
        resumed_config(DataConfig, out_dir / DATA_CONFIG, asdict(data_cfg), strict=True, what="data options")
    accelerator = make_accelerator(train_cfg, out_dir)
    console = make_console(accelerator.is_main_process)
    set_seed(train_cfg.seed)
    with accelerator.main_process_first():
        data = load_image_data(data_cfg)
    cfg = resolve_config(run_dir, model_overrides or {}, data, resume)
    console.print(f"data: {data.source}: {len(data.train.images)} train / {len(data.test.images)} test images, "
                  f"{data.channels}x{data.height}x{data.width}, {data.num_classes} classes")
    console.print(f"VQ-VAE: K={cfg.codebook_size}, d={cfg.code_dim}, grid {cfg.grid_shape[0]}x{cfg.grid_shape[1]}, "
                  f"codebook update {cfg.codebook_update}")
    if len(data.train.images) < train_cfg.batch_size:
        raise VQGenError(f"batch size {train_cfg.batch_size} is larger than the {len(data.train.images)} "
                         "training images")
    if accelerator.is_main_process:  # everything is validated: only now is anything written
        if overwrite and not resume:
            clear_stage_dir(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.json")
        save_config(data_cfg, out_dir / DATA_CONFIG)
    accelerator.wait_for_everyone()

    model = VQVAE(cfg).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay)
    train_loader = make_loader(ImageDataset(data.train), train_cfg.batch_size, train=True, seed=train_cfg.seed)
    test_loader = accelerator.prepare(make_loader(ImageDataset(data.test), train_cfg.batch_size))
    preview = to_model_range(data.test.images[:16])
    stage = VQVAEStage(accelerator, cfg, test_loader, out_dir, preview)
    metrics = fit(accelerator, train_cfg, stage, model, optimizer, train_loader, out_dir, resume, console)
    if encode:
        encode_splits(accelerator, accelerator.unwrap_model(model), data, run_dir, train_cfg.batch_size, console)
    return metrics


def train_from_options(run_dir: str | Path, data: dict[str, Any], training: dict[str, Any], model: dict[str, Any],
                       resume: bool = False, encode: bool = True, overwrite: bool = False) -> dict[str, float]:
    """What `scripts/train_vqvae.py` calls with the options given on its command line.

    A fresh run starts from the defaults; --resume starts from the run's saved configs.
    """
    out_dir = Path(run_dir) / VQVAE_DIR
    if resume and (out_dir / DATA_CONFIG).is_file() and (out_dir / TRAIN_CONFIG).is_file():
        data_cfg = resumed_config(DataConfig, out_dir / DATA_CONFIG, data, strict=True, what="data options")
        train_cfg = resumed_config(TrainConfig, out_dir / TRAIN_CONFIG, training, strict=False, what="")
    else:
        data_cfg = DataConfig(**data)
        train_cfg = TrainConfig(**{**TRAIN_DEFAULTS, **training})
    return train_vqvae(run_dir, data_cfg, train_cfg, model, resume=resume, encode=encode, overwrite=overwrite)

