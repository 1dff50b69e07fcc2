"""Stage 1: train the VQ-VAE with the shared loop, then dump the dataset's code grids."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader

from stage1_vqvae.config import TRAIN_DEFAULTS, GANConfig, VQVAEConfig, check_side_options, preset_options
from stage1_vqvae.encode import encode_splits
from stage1_vqvae.gan_loss import GANLoss
from stage1_vqvae.model import VQVAE, kmeans_sample_note, reconstruction_errors
from stage1_vqvae.perceptual import own_feature_net
from vqgen.core.data.augment import augment
from vqgen.core.data.config import DataConfig, parse_augment
from vqgen.core.data.images import ImageData, ImageDataset, load_image_data, to_model_range, to_uint8
from vqgen.core.data.loaders import make_loader
from vqgen.core.evaluate.measures import code_usage, psnr
from vqgen.core.evaluate.quality import Judge, frechet_distance_of, judge_features, run_judge, save_judge
from vqgen.core.runtime.console import make_console
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.runtime.processes import from_main, process_state
from vqgen.core.store.configs import resumed_config
from vqgen.core.store.imageio import grid, save_png
from vqgen.core.store.jsonl import JsonlLog
from vqgen.core.store.layout import ModelDir, RunLayout
from vqgen.core.store.lock import holds_stage_lock
from vqgen.core.store.weights import check_stage_dir
from vqgen.core.training.config import TrainConfig
from vqgen.core.training.loop import fit, make_optimizer, refresh_report
from vqgen.core.training.setup import as_options, check_batch_size, start, train_config, write_stage_files
from vqgen.core.training.sizing import EVAL_SHARE, report_sized, sized_batch, sized_schedule


@dataclass
class VQVAETask:
    """What the shared loop (`vqgen.core.training.loop.fit`) trains in stage 1: the loss, the test evaluation."""

    accelerator: Accelerator
    config: VQVAEConfig
    test_loader: DataLoader
    stage_dir: ModelDir
    preview: Tensor               # (16, c, H, W) test images for the reconstruction grid
    augment: tuple[str, ...] = ()  # training-batch augmentations (`vqgen.core.data.augment`)
    name: str = "vqvae"
    held_out: tuple[str, str] = ("mse", "recon_mse")
    gan: GANLoss | None = None     # adversarial and perceptual terms, and the discriminator (None: off)
    judge: Judge | None = None     # sharpness: the run's judge scores the test reconstructions (None: MSE alone)
    psnr_slack: float = 1.0        # sharpness: the PSNR (dB) below the best a kept evaluation may give up

    def __post_init__(self):
        self._counts = torch.zeros(self.config.codebook_size, dtype=torch.long, device=self.accelerator.device)
        self._images: dict[str, Tensor] = {}  # the last evaluation's, for the trackers
        self.held_out_within = None
        if self.judge is not None:  # the lowest reconstruction FID, within psnr_slack of the best PSNR
            self.held_out, self.held_out_within = ("recon_fid", "recon_mse"), ("psnr", self.psnr_slack)

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
        errors, counts, features = [], torch.zeros(self.config.codebook_size, dtype=torch.long), []
        for batch in self.test_loader:
            mse, recon, indices = reconstruction_errors(model, batch["image"])
            pair = () if self.judge is None else sharpness_features(self.judge, batch["image"], recon)
            mse, indices, *pair = self.accelerator.gather_for_metrics((mse, indices, *pair))
            errors.append(mse.cpu())
            if pair:
                features.append([f.cpu() for f in pair])
            # counted per batch: a large test split's codes are never held together
            counts += torch.bincount(indices.cpu().flatten(), minlength=self.config.codebook_size)
        mse = torch.cat(errors).mean().item()
        sharpness = {}
        if self.judge is not None:
            real, made = (torch.cat(side) for side in zip(*features))
            sharpness = {"recon_fid": frechet_distance_of(real, made)}
        if self.accelerator.is_main_process:
            recon = self.accelerator.unwrap_model(model)(self.preview.to(self.accelerator.device)).recon
            pair = torch.cat([to_uint8(self.preview), to_uint8(recon.float().cpu())])
            self._images = {"reconstructions": grid(pair, nrow=len(self.preview))}
            save_png(self._images["reconstructions"], self.stage_dir.reconstructions / f"step-{step:07d}.png")
        return {"mse": mse, "psnr": psnr(mse), **sharpness, **code_usage(counts)}

    def eval_images(self) -> dict[str, Tensor]:
        """The last evaluation's test originals over their reconstructions, (c, H, W) uint8 (main process)."""
        return self._images


def sharpness_features(judge: Judge, images: Tensor, recon: Tensor) -> tuple[Tensor, Tensor]:
    """The judge's features of test images and of their reconstructions, both (b, c, H, W) in [-1, 1], scored as
    saved images are (uint8), as `vqgen eval` scores them: the two sides of the reconstructions' FID."""
    both = to_uint8(torch.cat([images, recon]))
    return judge_features(judge, both, batch_size=len(both)).chunk(2)


def model_config(stage: ModelDir, given: dict[str, Any], sized: dict[str, Any], data: ImageData,
                 resume: bool) -> VQVAEConfig:
    """The model config: a fresh run's from the data's shape, the sized defaults and the given options; a resumed
    run's saved one, refusing a given option that differs. Either must fit the data's images."""
    if resume and stage.config.is_file():
        cfg = resumed_config(VQVAEConfig, stage.config, given, strict=True, what="model options")
    else:
        cfg = VQVAEConfig(**{"in_channels": data.channels, "image_height": data.height,
                             "image_width": data.width, **sized, **given})
    if (cfg.in_channels, cfg.image_height, cfg.image_width) != (data.channels, data.height, data.width):
        raise VQGenError(
            f"the data has {data.channels}x{data.height}x{data.width} images but the VQ-VAE expects "
            f"{cfg.in_channels}x{cfg.image_height}x{cfg.image_width}"
        )
    return cfg


def gan_config(stage: ModelDir, given: dict[str, Any], resume: bool) -> GANConfig:
    """The adversarial options: the given ones, or on resume the run's (none saved: all off), refusing changes."""
    if resume and stage.gan_config.is_file():
        return resumed_config(GANConfig, stage.gan_config, given, strict=True, what="adversarial options")
    cfg = GANConfig(**given)
    if resume and stage.config.is_file() and (cfg.terms or cfg.judged):
        what = "adversarial or perceptual terms" if cfg.terms else "sharpness (its best weights followed the MSE)"
        raise VQGenError(f"{stage.path} was trained without {what}; they cannot be switched on when resuming it "
                         "(train a new run)")
    return cfg


def own_features(accelerator: Accelerator, stage: ModelDir, gan: GANConfig, images: ImageData, resume: bool,
                 console) -> tuple[Judge | None, bool]:
    """The network of the perceptual own_features term (None without it) and whether it was trained now (to be
    saved in stage.perceptual_net) rather than loaded from there. Trained in every process, each then given the
    main process's weights: bit-identical on the CPU, not always on CUDA."""
    if not (gan.perceptual_weight and gan.perceptual == "own_features"):
        return None, False
    net, loaded = own_feature_net(stage.perceptual_net, images, accelerator.device, load=resume)
    if not loaded and accelerator.num_processes > 1:
        net.load_state_dict(from_main(accelerator, {k: v.cpu() for k, v in net.state_dict().items()}))
    console.print(f"perceptual own_features: a {sum(p.numel() for p in net.parameters()):,}-parameter network "
                  f"{'loaded from' if loaded else 'trained on the training images, saved to'} "
                  f"{stage.perceptual_net.path}")
    return net, not loaded


def adversarial_verdict(records: list[dict[str, Any]], gan: GANConfig, best_step: int) -> str | None:
    """One line when the adversarial phase did not give the kept weights: `records` are metrics.jsonl's, whose
    test lines carry recon_fid and psnr; None when a step after `adversarial_start` was kept or none was tested."""
    tests = [r for r in records if r.get("split") == "test" and "recon_fid" in r]
    kept = next((r for r in tests if r["step"] == best_step), None)
    after = [r for r in tests if r["step"] > gan.adversarial_start]
    if kept is None or best_step > gan.adversarial_start or not after:
        return None
    sharpest = min(after, key=lambda r: r["recon_fid"])
    top = max(r["psnr"] for r in tests)
    why = (f"its lowest reconstruction FID ({sharpest['recon_fid']:.4g} at step {sharpest['step']}) cost "
           f"{top - sharpest['psnr']:.2f} dB of test PSNR, more than psnr_slack {gan.psnr_slack:g}"
           if sharpest["recon_fid"] < kept["recon_fid"] else
           f"its lowest reconstruction FID was {sharpest['recon_fid']:.4g} (step {sharpest['step']})")
    return (f"the adversarial phase (from step {gan.adversarial_start}) did not beat step {best_step}'s "
            f"reconstructions (FID {kept['recon_fid']:.4g}, {kept['psnr']:.2f} dB): {why}; the run keeps step "
            f"{best_step}'s weights")


# Steps, not passes, decide how sharp a VQ-VAE gets: it does not memorise a small dataset the way a prior
# does. On OpenMoji (2.2k images) 60 passes (2,100 steps of 64, an earlier rule) left the test PSNR rising:
# 21.50 dB and a reconstruction FID of 1.28 there, 22.37 dB and 0.49 at 6,000 steps of 64. At the default
# batch of 32 (config.TRAIN_DEFAULTS), 12,000 steps are those same 384k images with twice the updates
# (docs/defaults.md).
STAGE1_STEPS = 12000


def sized_defaults(data: ImageData, given_training: dict[str, Any],
                   processes: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stage-1 defaults from the data (docs/defaults.md): model options, training options.

    Width: 128 channels for colour images or sides of 64 px and more (more to reconstruct per code),
    64 for small grey images. Length: STAGE1_STEPS whatever the number of images, evaluated 10 times
    (the best evaluation's weights are kept; early stopping ends a stalled run sooner), or fewer times where
    evaluating the test images that often would cost more than EVAL_SHARE of the training (`sized_schedule`).
    Batch: all the training images when they are fewer than the default batch.
    """
    wide = data.channels == 3 or max(data.height, data.width) >= 64
    model = {"hidden_channels": 128, "res_channels": 64} if wide else {"hidden_channels": 64, "res_channels": 32}
    small = sized_batch(given_training, TRAIN_DEFAULTS["batch_size"], len(data.train))
    batch = {**TRAIN_DEFAULTS, **small, **given_training}["batch_size"]
    training = {**sized_schedule(given_training, STAGE1_STEPS, evaluations=10, batch=batch * processes,
                                 held_out=len(data.test)), **small}
    return model, training


@holds_stage_lock("vqvae")  # one writer per stage folder: a second run is refused
def train_vqvae(
    run_dir: str | Path,
    data: DataConfig | dict[str, Any] | None = None,
    training: TrainConfig | dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    *,
    gan: GANConfig | dict[str, Any] | None = None,
    preset: str | None = None,
    resume: bool = False,
    encode: bool = True,
    overwrite: bool = False,
) -> dict[str, float]:
    """Stage 1's one entry point (`vqgen train vqvae`, scripts/train_vqvae.py, the tests): train the VQ-VAE into
    RUN/vqvae, then (by default) encode every split to its code grids. Returns the best evaluation's metrics.

    `data`, `training`, `model`, `gan` (adversarial and perceptual terms; none: a plain VQ-VAE): the options given,
    as a dict of config fields or a whole config (all of whose fields count as given). A fresh run fills the others
    with the defaults sized to the data, under `preset`'s model options; a resumed run takes them from its saved
    configs and refuses a data or model option that differs. Every option is checked before anything is written, and
    those that can be before any image is decoded.
    """
    run = RunLayout(run_dir)
    stage = run.vqvae
    check_stage_dir(stage, "VQ-VAE", resume, overwrite)
    given_training, given_model = as_options(training), preset_options(preset, as_options(model))
    if resume and stage.data_config.is_file():
        data_cfg = resumed_config(DataConfig, stage.data_config, as_options(data), strict=True, what="data options")
    else:
        data_cfg = DataConfig(**as_options(data))
        if data_cfg.image_size:  # a large folder is converted first: refuse a bad downsampling before that
            check_side_options(given_model, data_cfg.image_size, data_cfg.image_size)
    gan_cfg = gan_config(stage, as_options(gan), resume)
    schedule = {} if resume else sized_schedule(given_training, STAGE1_STEPS, evaluations=10)
    train_cfg = train_config(stage, given_training, {**TRAIN_DEFAULTS, **schedule}, resume)
    if train_cfg.weight_average:  # the average would blend the codebook's restarted rows with their past
        raise VQGenError(f"weight_average={train_cfg.weight_average}: a weight average is kept for stage 2 "
                         "(the priors) only; train the VQ-VAE without it")
    state = process_state()
    with state.main_process_first():
        images = load_image_data(data_cfg, make_console(state.is_main_process))
    sized_model, sized_training = ({}, {}) if resume else sized_defaults(images, given_training, state.num_processes)
    # known once the images are: a batch of all of them where they are fewer than the default, and the
    # evaluation cadence that the test split affords
    fitted = {k: v for k, v in sized_training.items() if k in ("batch_size", "eval_every", "save_every")
              and k not in given_training}
    train_cfg = dataclasses.replace(train_cfg, **fitted)
    cfg = model_config(stage, given_model, sized_model, images, resume)
    report_sized(sized_model, sized_training, {**given_model, **given_training}, resume,
                 why={"eval_every": f"{len(images.test)} test images, at most {EVAL_SHARE:.0%} of the training"})
    check_batch_size(train_cfg.batch_size, len(images.train), "training images")

    accelerator, console = start(stage, train_cfg)
    console.print(f"data: {images.source}: {len(images.train)} train / {len(images.test)} test images, "
                  f"{images.channels}x{images.height}x{images.width}, {images.num_classes} classes, {images.storage}")
    console.print(f"VQ-VAE: K={cfg.codebook_size}, d={cfg.code_dim}, grid {cfg.grid_shape[0]}x{cfg.grid_shape[1]}, "
                  f"codebook update {cfg.codebook_update}")
    note = None if resume else kmeans_sample_note(cfg, train_cfg.batch_size)
    if note:
        console.print(f"[bold yellow]warning:[/] {note}")
    if gan_cfg.adversarial and train_cfg.max_steps and gan_cfg.adversarial_start >= train_cfg.max_steps:
        raise VQGenError(f"adversarial_start {gan_cfg.adversarial_start} is not before max_steps "
                         f"{train_cfg.max_steps}: the discriminator would never train (lower --adversarial-start "
                         "or raise --max-steps)")
    if gan_cfg.judged and len(images.test) < 2:
        raise VQGenError(f"sharpness needs a test split of at least 2 images to score an FID, {images.source} "
                         f"has {len(images.test)} (train with --sharpness off)")
    files = {stage.config: cfg, stage.data_config: data_cfg}
    feature_net, trained_net = own_features(accelerator, stage, gan_cfg, images, resume, console)
    gan_loss = None
    if gan_cfg.terms:
        # before any write (LPIPS may be refused); the discriminator draws from an RNG of its own
        gan_loss = GANLoss(gan_cfg, cfg, accelerator, train_cfg.learning_rate, train_cfg.seed, feature_net)
        terms = [f"adversarial: weight {gan_cfg.adversarial_weight} from step {gan_cfg.adversarial_start} "
                 f"({gan_cfg.adversarial_loss})"] if gan_cfg.adversarial else []
        if gan_cfg.perceptual_weight:
            terms.append(f"perceptual {gan_cfg.perceptual} x {gan_cfg.perceptual_weight}")
        console.print(", ".join(terms))
    if gan_cfg.terms or gan_cfg.judged:
        files[stage.gan_config] = gan_cfg
    write_stage_files(accelerator, stage, files, fresh=overwrite and not resume)
    if trained_net and accelerator.is_main_process:  # saved once the stage's configs are
        save_judge(feature_net, stage.perceptual_net.path)
    judge = None
    if gan_cfg.judged:  # a fresh stage 1 trains the run's judge anew: the images may differ from the last run's
        with accelerator.main_process_first():
            judge = run_judge(run.judge, images, accelerator.device, retrain=not resume and accelerator.is_main_process)
        console.print(f"sharpness: the test reconstructions' in-domain FID in the judge's features ({run.judge.path}); "
                      f"kept weights: the lowest FID within {gan_cfg.psnr_slack:g} dB of the best test PSNR")

    model = VQVAE(cfg).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, train_cfg)
    train_loader = make_loader(ImageDataset(images.train), train_cfg.batch_size, train=True, seed=train_cfg.seed,
                               num_workers=train_cfg.num_workers)
    test_loader = accelerator.prepare(make_loader(ImageDataset(images.test), train_cfg.batch_size,
                                                  num_workers=train_cfg.num_workers))
    preview = to_model_range(images.test.take(range(min(16, len(images.test)))))
    task = VQVAETask(accelerator, cfg, test_loader, stage, preview, parse_augment(data_cfg.augment), gan=gan_loss,
                     judge=judge, psnr_slack=gan_cfg.psnr_slack)
    metrics = fit(accelerator, train_cfg, task, model, optimizer, train_loader, stage, resume, console)
    if judge is not None and gan_cfg.adversarial:
        verdict = adversarial_verdict(JsonlLog(stage.metrics).read(), gan_cfg, metrics["best_step"])
        if verdict:
            console.print(f"[bold yellow]warning:[/] {verdict}")
    if encode:
        encode_splits(accelerator, accelerator.unwrap_model(model), images, data_cfg, run, train_cfg.batch_size,
                      console, train_cfg.num_workers)
        refresh_report(accelerator, train_cfg, stage, console)  # now with the codes' frequencies
    return metrics
