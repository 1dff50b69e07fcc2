"""Stage 1: train the VQ-VAE with the shared loop, then dump the dataset's code grids."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader

from stage1_vqvae.adversarial import GANConfig
from stage1_vqvae.encode import encode_splits
from stage1_vqvae.gan_loss import GANLoss
from stage1_vqvae.model import VQVAE, VQVAEConfig, kmeans_sample_note, reconstruction_errors
from vqgen.core.batches import make_loader
from vqgen.core.checkpoint import check_stage_dir
from vqgen.core.config import resumed_config
from vqgen.core.console import make_console
from vqgen.core.data.augment import augment
from vqgen.core.data.config import DataConfig, parse_augment
from vqgen.core.data.images import ImageData, ImageDataset, load_image_data, to_model_range, to_uint8
from vqgen.core.errors import VQGenError
from vqgen.core.imageio import grid, save_png
from vqgen.core.layout import RunLayout, StageDir
from vqgen.core.agree import process_state
from vqgen.core.lock import holds_stage_lock
from vqgen.core.metrics import code_usage, psnr
from vqgen.core.stage import (check_batch_size, sized_batch, sized_model_options, sized_schedule, start,
                              train_config, write_stage_files)
from vqgen.core.trainer import TrainConfig, fit, make_optimizer, refresh_report

# Stage-1 training defaults, chosen by measurement (README, "Defaults"); any option overrides them.
TRAIN_DEFAULTS = dict(batch_size=64, learning_rate=1e-3, max_steps=1000, warmup_steps=100, eval_every=500,
                      save_every=500)

# Model options by image side (`--preset 128`), a thin layer over VQVAEConfig: they fill only the options
# not given. Each codes its images as a 16x16 grid (8x8 at 32 px, the paper's net).
PRESETS: dict[str, dict[str, Any]] = {
    "32": dict(architecture="paper", downsample=4),
    "64": dict(architecture="resnet", downsample=4, hidden_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1),
    "128": dict(architecture="resnet", downsample=8, hidden_channels=32, channel_mult=(1, 1, 2, 4),
                num_res_blocks=1),
    "256": dict(architecture="resnet", downsample=16, hidden_channels=32, channel_mult=(1, 1, 2, 2, 4),
                num_res_blocks=2, attention=True),
}
RESNET_ONLY = ("channel_mult", "attention", "patch_size")


@dataclass
class VQVAEStage:
    """The stage-1 callbacks for `vqgen.core.trainer.fit`."""

    accelerator: Accelerator
    config: VQVAEConfig
    test_loader: DataLoader
    stage_dir: StageDir
    preview: Tensor               # (16, c, H, W) test images for the reconstruction grid
    augment: tuple[str, ...] = ()  # training-batch augmentations (`vqgen.core.data.augment`)
    name: str = "vqvae"
    held_out: tuple[str, str] = ("mse", "recon_mse")
    gan: GANLoss | None = None     # adversarial and perceptual terms, and the discriminator (None: off)

    def __post_init__(self):
        self._counts = torch.zeros(self.config.codebook_size, dtype=torch.long, device=self.accelerator.device)
        self._images: dict[str, Tensor] = {}  # the last evaluation's, for the trackers

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        images = augment(batch["image"], self.augment) if self.augment else batch["image"]
        out = model(images.contiguous(memory_format=torch.channels_last))
        self._counts += out.quant.counts.detach()  # already summed over processes; stays on the device
        logs = {
            "loss": out.loss.detach(),
            "recon_mse": out.recon_loss.detach() / 4,  # [-1, 1] -> [0, 1] pixels
            "commitment": out.quant.commitment_loss.detach(),
            "codebook": out.quant.codebook_loss.detach(),
        }
        if self.gan is None:
            return out.loss, logs
        # "loss" stays reconstruction + codebook + commitment, comparable with plain runs; the terms added are
        # logged on their own
        extra, gan_logs = self.gan.generator_terms(model, images, out)
        return out.loss + extra, {**logs, **gan_logs}

    def at_step(self, step: int) -> None:
        if self.gan is not None:
            self.gan.step = step

    def auxiliary(self) -> tuple[nn.Module, torch.optim.Optimizer] | None:
        """The discriminator and its optimizer, when the adversarial term is on."""
        return (self.gan.critic, self.gan.optimizer) if self.gan is not None and self.gan.critic else None

    def auxiliary_loss(self, critic: nn.Module) -> tuple[Tensor, dict[str, Tensor]] | None:
        return self.gan.discriminator_loss(critic)

    def window_metrics(self) -> dict[str, float]:
        usage = code_usage(self._counts.cpu())
        self._counts.zero_()
        return usage

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        model.eval()
        errors, counts = [], torch.zeros(self.config.codebook_size, dtype=torch.long)
        for batch in self.test_loader:
            mse, _, indices = reconstruction_errors(model, batch["image"])
            mse, indices = self.accelerator.gather_for_metrics((mse, indices))
            errors.append(mse.cpu())
            # counted per batch: a large test split's codes are never held together
            counts += torch.bincount(indices.cpu().flatten(), minlength=self.config.codebook_size)
        mse = torch.cat(errors).mean().item()
        if self.accelerator.is_main_process:
            recon = self.accelerator.unwrap_model(model)(self.preview.to(self.accelerator.device)).recon
            pair = torch.cat([to_uint8(self.preview), to_uint8(recon.float().cpu())])
            self._images = {"reconstructions": grid(pair, nrow=len(self.preview))}
            save_png(self._images["reconstructions"], self.stage_dir.reconstructions / f"step-{step:07d}.png")
        return {"mse": mse, "psnr": psnr(mse), **code_usage(counts)}

    def eval_images(self) -> dict[str, Tensor]:
        """The last evaluation's test originals over their reconstructions, (c, H, W) uint8 (main process)."""
        return self._images


def resolve_config(stage: StageDir, overrides: dict[str, Any], data: ImageData, resume: bool) -> VQVAEConfig:
    """The model config: from the data and the options, or on resume from the run, refusing conflicts."""
    if resume and stage.config.is_file():
        cfg = resumed_config(VQVAEConfig, stage.config, overrides, strict=True, what="model options")
    else:
        cfg = VQVAEConfig(**{"in_channels": data.channels, "image_height": data.height,
                             "image_width": data.width, **overrides})
    if (cfg.in_channels, cfg.image_height, cfg.image_width) != (data.channels, data.height, data.width):
        raise VQGenError(
            f"the data has {data.channels}x{data.height}x{data.width} images but the VQ-VAE expects "
            f"{cfg.in_channels}x{cfg.image_height}x{cfg.image_width}"
        )
    return cfg


def resolve_gan_config(stage: StageDir, given: dict[str, Any], resume: bool) -> GANConfig:
    """The adversarial options: the given ones, or on resume the run's (none saved: all off), refusing changes."""
    if resume and stage.gan_config.is_file():
        return resumed_config(GANConfig, stage.gan_config, given, strict=True, what="adversarial options")
    cfg = GANConfig(**given)
    if resume and stage.config.is_file() and (cfg.adversarial or cfg.perceptual_weight):
        raise VQGenError(f"{stage.path} was trained without adversarial or perceptual terms; they cannot be "
                         "switched on when resuming it (train a new run)")
    return cfg


def preset_options(preset: str | None, given_model: dict[str, Any]) -> dict[str, Any]:
    """The model options of `preset` under the given ones. A preset's channel_mult gives way to a given
    downsample or patch_size (its levels would not match), and its resnet-only options to a given
    architecture paper."""
    if preset is None:
        return given_model
    if preset not in PRESETS:
        raise VQGenError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    options = dict(PRESETS[preset])
    if "downsample" in given_model or "patch_size" in given_model:
        options.pop("channel_mult", None)
    if given_model.get("architecture") == "paper":
        for name in RESNET_ONLY:
            options.pop(name, None)
    return {**options, **given_model}


# Steps, not passes, decide how sharp a VQ-VAE gets: it does not memorise a small dataset the way a prior
# does. On OpenMoji (2.2k images) 60 passes (2,100 steps, the rule before) left the test PSNR rising:
# 21.50 dB and a reconstruction FID of 1.28 there, 22.37 dB and 0.49 at 6,000 (README, "Defaults sized
# to the data"). Shapes and MNIST already got 6,000.
STAGE1_STEPS = 6000


def sized_defaults(data: ImageData, given_training: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stage-1 defaults from the data (README, "Defaults sized to the data"): model options, training options.

    Width: 128 channels for colour images or sides of 64 px and more (more to reconstruct per code),
    64 for small grey images. Length: STAGE1_STEPS whatever the number of images, evaluated 10 times
    (the best evaluation's weights are kept; early stopping ends a stalled run sooner). Batch: all the
    training images when they are fewer than the default batch.
    """
    wide = data.channels == 3 or max(data.height, data.width) >= 64
    model = {"hidden_channels": 128, "res_channels": 64} if wide else {"hidden_channels": 64, "res_channels": 32}
    training = {**sized_schedule(given_training, STAGE1_STEPS, evaluations=10),
                **sized_batch(given_training, TRAIN_DEFAULTS["batch_size"], len(data.train))}
    return model, training


@holds_stage_lock("vqvae")  # one writer per stage folder: a second run is refused
def train_vqvae(
    run_dir: str | Path,
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    model_overrides: dict[str, Any] | None = None,
    resume: bool = False,
    encode: bool = True,
    overwrite: bool = False,
    data: ImageData | None = None,
    gan: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Train stage 1 into the run's vqvae folder, then (by default) encode every split to its codes.

    `data`: the images of `data_cfg`, when the caller has loaded them already. `gan`: GANConfig options
    (adversarial and perceptual terms; none: a plain VQ-VAE, as before).
    """
    run = RunLayout(run_dir)
    stage = run.vqvae
    check_stage_dir(stage, "VQ-VAE", resume, overwrite)
    if resume and stage.data_config.is_file():
        resumed_config(DataConfig, stage.data_config, asdict(data_cfg), strict=True, what="data options")
    accelerator, console = start(stage, train_cfg)
    if data is None:
        with accelerator.main_process_first():
            data = load_image_data(data_cfg, console)
    cfg = resolve_config(stage, model_overrides or {}, data, resume)
    gan_cfg = resolve_gan_config(stage, gan or {}, resume)
    console.print(f"data: {data.source}: {len(data.train)} train / {len(data.test)} test images, "
                  f"{data.channels}x{data.height}x{data.width}, {data.num_classes} classes, {data.storage}")
    console.print(f"VQ-VAE: K={cfg.codebook_size}, d={cfg.code_dim}, grid {cfg.grid_shape[0]}x{cfg.grid_shape[1]}, "
                  f"codebook update {cfg.codebook_update}")
    check_batch_size(train_cfg.batch_size, len(data.train), "training images")
    note = None if resume else kmeans_sample_note(cfg, train_cfg.batch_size)
    if note:
        console.print(f"[bold yellow]warning:[/] {note}")
    files = {stage.config: cfg, stage.data_config: data_cfg}
    gan_loss = None
    if gan_cfg.adversarial or gan_cfg.perceptual_weight:
        # before any write (LPIPS may be refused); the discriminator draws from an RNG of its own
        gan_loss = GANLoss(gan_cfg, cfg, accelerator, train_cfg.learning_rate, train_cfg.seed)
        console.print(f"adversarial: weight {gan_cfg.adversarial_weight} from step {gan_cfg.adversarial_start} "
                      f"({gan_cfg.adversarial_loss}), perceptual {gan_cfg.perceptual} x {gan_cfg.perceptual_weight}")
        files[stage.gan_config] = gan_cfg
    write_stage_files(accelerator, stage, files, fresh=overwrite and not resume)

    model = VQVAE(cfg).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, train_cfg)
    train_loader = make_loader(ImageDataset(data.train), train_cfg.batch_size, train=True, seed=train_cfg.seed,
                               num_workers=train_cfg.num_workers)
    test_loader = accelerator.prepare(make_loader(ImageDataset(data.test), train_cfg.batch_size,
                                                  num_workers=train_cfg.num_workers))
    preview = to_model_range(data.test.take(range(min(16, len(data.test)))))
    vqvae_stage = VQVAEStage(accelerator, cfg, test_loader, stage, preview, parse_augment(data_cfg.augment),
                             gan=gan_loss)
    metrics = fit(accelerator, train_cfg, vqvae_stage, model, optimizer, train_loader, stage, resume, console)
    if encode:
        encode_splits(accelerator, accelerator.unwrap_model(model), data, data_cfg, run, train_cfg.batch_size,
                      console, train_cfg.num_workers)
        refresh_report(accelerator, train_cfg, stage, console)  # now with the codes' frequencies
    return metrics


def train_from_options(run_dir: str | Path, data: dict[str, Any], training: dict[str, Any], model: dict[str, Any],
                       resume: bool = False, encode: bool = True, overwrite: bool = False,
                       preset: str | None = None) -> dict[str, float]:
    """What `scripts/train_vqvae.py` calls with the options given on its command line.

    A fresh run starts from the defaults; resuming starts from the run's saved configs. `preset`: the
    PRESETS entry whose model options count as given, under those given.
    """
    model = preset_options(preset, model)
    stage = RunLayout(run_dir).vqvae
    check_stage_dir(stage, "VQ-VAE", resume, overwrite)
    if resume and stage.data_config.is_file():
        data_cfg = resumed_config(DataConfig, stage.data_config, data, strict=True, what="data options")
    else:
        data_cfg = DataConfig(**data)
    TrainConfig(**{**TRAIN_DEFAULTS, **training})  # refuse bad training options before loading any data
    if data_cfg.image_size and not resume:
        # and bad model options, where the image size is known: a large folder would otherwise be
        # converted first, minutes before the same refusal
        side = data_cfg.image_size
        VQVAEConfig(**{"image_height": side, "image_width": side, **model})
    with process_state().main_process_first():
        images = load_image_data(data_cfg, make_console(process_state().is_main_process))
    sized_model, sized_training = sized_defaults(images, training)
    train_cfg = train_config(stage, training, {**TRAIN_DEFAULTS, **sized_training}, resume)
    model = sized_model_options(model, training, sized_model, sized_training, resume)
    return train_vqvae(run_dir, data_cfg, train_cfg, model, resume=resume, encode=encode, overwrite=overwrite,
                       data=images)
