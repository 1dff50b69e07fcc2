"""The adversarial and perceptual terms of one stage-1 training step, wired from `stage1_vqvae.adversarial`.

`GANLoss` is what `VQVAEStage` hands the shared loop: the terms it adds to the autoencoder's loss
(`generator_terms`), and the discriminator it trains beside the autoencoder (`critic`, `optimizer`,
`discriminator_loss`). The critic module holds the discriminator and its LeCam averages, so that one
`prepare`, one optimizer and the training state (model_1.safetensors, optimizer_1.bin) keep them together.
"""

from __future__ import annotations

import contextlib

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from stage1_vqvae.adversarial import (
    LeCam,
    adaptive_weight,
    d_accuracy,
    decoder_last_layer,
    frozen,
    gan_losses,
    r1_from_logits,
)
from stage1_vqvae.config import GANConfig, VQVAEConfig
from stage1_vqvae.diffaugment import apply_augment, augment_pair, draw_augment
from stage1_vqvae.discriminator import PatchDiscriminator
from stage1_vqvae.model import VQVAEOutput
from stage1_vqvae.perceptual import perceptual_loss
from vqgen.core.evaluate.quality import Judge

D_BETAS = (0.5, 0.9)  # VQGAN's Adam betas: a short memory for a target that moves with the other model


class Critic(nn.Module):
    """The patch discriminator and the LeCam averages of its outputs: (b, c, H, W) -> (b, 1, h, w) logits."""

    def __init__(self, gan: GANConfig, model: VQVAEConfig):
        super().__init__()
        self.disc = PatchDiscriminator(gan.discriminator_config(model.in_channels, model.image_height,
                                                                model.image_width))
        self.lecam = LeCam(gan.lecam_decay)

    def forward(self, x: Tensor) -> Tensor:
        return self.disc(x)


class GANLoss:
    """The adversarial and perceptual terms for `model_cfg`'s autoencoder, from step `gan.adversarial_start`."""

    def __init__(self, gan: GANConfig, model_cfg: VQVAEConfig, accelerator: Accelerator, learning_rate: float,
                 seed: int = 0, feature_net: Judge | None = None):
        self.cfg = gan
        self.accelerator = accelerator
        self.step = 0
        self.d_loss, self.g_loss = gan_losses(gan.adversarial_loss)
        self.critic = None
        if gan.adversarial:
            # initialised from a seed of its own, leaving the global RNG as it was: the autoencoder, the data
            # order and everything else start as in a run without the discriminator
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 1)
                self.critic = Critic(gan, model_cfg)
        self.optimizer = None
        if self.critic is not None:
            # the loop sets each group's learning rate to the schedule's times its lr_ratio
            ratio = gan.disc_learning_rate / learning_rate if gan.disc_learning_rate else 1.0
            self.optimizer = torch.optim.AdamW([{"params": list(self.critic.parameters()), "lr_ratio": ratio}],
                                               lr=learning_rate, betas=D_BETAS, weight_decay=0.0)
        self.perceptual = None
        if gan.perceptual_weight:
            features = self.critic.disc.features if self.critic is not None else None
            self.perceptual = perceptual_loss(gan.perceptual, features, feature_net).to(accelerator.device)
        self._pair: tuple[Tensor, Tensor] | None = None  # the last micro-batch's images and detached reconstructions

    @property
    def adversarial_now(self) -> bool:
        return self.critic is not None and self.step >= self.cfg.adversarial_start

    def _frozen_critic(self):
        return frozen(self.critic) if self.critic is not None else contextlib.nullcontext()

    def generator_terms(self, model: nn.Module, images: Tensor, out: VQVAEOutput) -> tuple[Tensor, dict[str, Tensor]]:
        """What the autoencoder's loss gains: w_p * perceptual + lambda * w_adv * g_loss, and their logs.

        The discriminator is frozen here: its weights get no gradient from the autoencoder's loss."""
        cfg, logs = self.cfg, {}
        extra = out.loss.new_zeros(())
        rec = out.recon_loss
        with self._frozen_critic(), self.accelerator.autocast():
            if self.perceptual is not None and (cfg.perceptual != "feature_matching" or self.adversarial_now):
                term = self.perceptual(out.recon, images).float()
                extra, rec = extra + cfg.perceptual_weight * term, rec + cfg.perceptual_weight * term
                logs["perceptual"] = term.detach()
            if self.adversarial_now:
                fake = out.recon
                if cfg.augment_names:
                    fake = apply_augment(fake, draw_augment(cfg.augment_names, *_bhw(fake), fake.device))
                g_adv = self.g_loss(self.critic(fake))
                if cfg.adaptive_weight:
                    last = decoder_last_layer(self.accelerator.unwrap_model(model))
                    weight = adaptive_weight(rec, g_adv, last, cfg.adversarial_weight, loss_scale=_loss_scale(
                        self.accelerator))
                else:
                    weight = g_adv.new_tensor(cfg.adversarial_weight)
                extra = extra + weight * g_adv
                logs.update(g_adv=g_adv.detach(), adaptive_weight=weight)
                self._pair = (images.detach(), out.recon.detach())
        return extra, logs

    def discriminator_loss(self, critic: nn.Module) -> tuple[Tensor, dict[str, Tensor]] | None:
        """The prepared critic's loss on the last micro-batch's images and reconstructions (detached: nothing
        reaches the autoencoder), with LeCam and R1; None before the adversarial start."""
        if not self.adversarial_now or self._pair is None:
            return None
        cfg = self.cfg
        images, recon = self._pair
        self._pair = None
        real, fake = augment_pair(images, recon, cfg.augment_names, shared=cfg.disc_augment_shared)
        if cfg.r1_weight:
            real = real.detach().requires_grad_(True)
        with self.accelerator.autocast():
            logits = critic(torch.cat([real, fake])).float()  # one forward: one backward for DDP
        real_logits, fake_logits = logits[: len(real)], logits[len(real):]
        loss = self.d_loss(real_logits, fake_logits)
        real_acc, fake_acc = d_accuracy(real_logits, fake_logits)
        logs = {"d_loss": loss.detach(), "d_real_acc": real_acc, "d_fake_acc": fake_acc}
        if cfg.lecam_weight:
            lecam = self.critic.lecam  # the prepared critic's own module (prepare wraps, never copies)
            lecam.update(real_logits, fake_logits, reduce=lambda t: self.accelerator.reduce(t, "mean"))
            term = lecam(real_logits, fake_logits)
            loss = loss + cfg.lecam_weight * term
            logs["lecam"] = term.detach()
        if cfg.r1_weight:
            term = r1_from_logits(real_logits, real)
            loss = loss + cfg.r1_weight * term
            logs["r1"] = term.detach()
        return loss, logs


def _bhw(x: Tensor) -> tuple[int, int, int]:
    return x.shape[0], x.shape[2], x.shape[3]


def _loss_scale(accelerator: Accelerator) -> Tensor | float:
    """The fp16 gradient scaler's factor as a device tensor (reading it as a float would wait for the device)."""
    scaler = getattr(accelerator, "scaler", None)
    scale = getattr(scaler, "_scale", None)  # GradScaler keeps it here once the first loss was scaled
    return scale if scale is not None else 1.0
