"""The adversarial stage 1 (VQGAN, Esser et al. 2021) in small pure pieces: its options, the two GAN
losses, VQGAN's adaptive weight, and the regularisers that keep a discriminator useful on small data
(LeCam, R1; differentiable augmentation is `stage1_vqvae.diffaugment`).

One step trains two models in turn. The autoencoder ("generator") minimises
    reconstruction + codebook + beta * commitment + w_p * perceptual + lambda * w_adv * g_loss(D(x'))
with the discriminator frozen; then the discriminator minimises
    d_loss(D(aug(x)), D(aug(sg[x']))) + w_lecam * LeCam + w_r1 * R1
on the reconstructions detached from the autoencoder. Both only from `adversarial_start` on.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stage1_vqvae.diffaugment import parse_disc_augment
from stage1_vqvae.discriminator import DISC_NORMS, DiscriminatorConfig, check_discriminator_options
from stage1_vqvae.model import VQVAE, Decoder
from stage1_vqvae.perceptual import PERCEPTUAL_KINDS
from stage1_vqvae.trunk import ResnetDecoder
from vqgen.core.store.configs import option
from vqgen.core.runtime.errors import VQGenError

GAN_LOSSES = ("hinge", "non_saturating")


@dataclass(frozen=True)
class GANConfig:
    """The adversarial and perceptual terms of stage 1 and the discriminator's regularisers (all off at the
    defaults: with both weights 0 stage 1 trains exactly as a plain VQ-VAE)."""

    adversarial_weight: float = option(0.0, "base weight of the adversarial term for the autoencoder, times "
                                       "VQGAN's adaptive weight (0: off, no discriminator)")
    adaptive_weight: bool = option(True, "scale the adversarial term by ||grad rec|| / ||grad adv|| at the "
                                   "decoder's last layer (VQGAN); off: the base weight alone")
    adversarial_start: int = option(0, "optimizer step at which the discriminator and the adversarial term "
                                    "start (let the reconstructions settle first)")
    adversarial_loss: str = option("hinge", "GAN loss: hinge or non_saturating", choices=GAN_LOSSES)
    disc_width: int = option(64, "discriminator: channels of its first conv, doubled by each strided layer up "
                             "to 8x")
    disc_layers: int = option(0, "discriminator: stride-2 conv layers (0: from the image side, so a logit "
                              "judges a patch of at most half of it)")
    disc_norm: str = option("group", "discriminator normalisation: group, spectral or none (never BatchNorm)",
                            choices=DISC_NORMS)
    disc_learning_rate: float = option(0.0, "discriminator learning rate (0: the autoencoder's); it follows the "
                                       "same warm-up and schedule")
    disc_augment: str = option("color,translation,cutout", "differentiable augmentation of what the "
                               "discriminator sees: 'none' or a comma list of color, translation, cutout")
    disc_augment_shared: bool = option(True, "augment each real image and its reconstruction with the same "
                                       "random parameters")
    lecam_weight: float = option(0.0, "LeCam regulariser of the discriminator: pulls its outputs towards "
                                 "moving averages of the other side's (0: off)")
    lecam_decay: float = option(0.99, "decay of LeCam's moving averages")
    r1_weight: float = option(0.0, "R1 penalty of the discriminator: this times the squared gradient norm of "
                              "its output at real images (gamma / 2 in Mescheder et al.; 0: off)")
    perceptual: str = option("ms_ssim", "perceptual term: lpips (needs the lpips package and its weights), "
                             "ssim, ms_ssim (no download) or feature_matching (the discriminator's features, "
                             "from adversarial_start)", choices=PERCEPTUAL_KINDS)
    perceptual_weight: float = option(0.0, "weight of the perceptual term in the autoencoder's loss (0: off)")

    def __post_init__(self):
        for name in ("adversarial_weight", "disc_learning_rate", "lecam_weight", "r1_weight", "perceptual_weight"):
            value = getattr(self, name)
            if not (value >= 0 and value < float("inf")):
                raise VQGenError(f"{name} must be a finite number >= 0, got {value}")
        if self.adversarial_start < 0:
            raise VQGenError(f"adversarial_start must be >= 0, got {self.adversarial_start}")
        if self.adversarial_loss not in GAN_LOSSES:
            raise VQGenError(f"adversarial_loss must be one of {', '.join(GAN_LOSSES)}, got {self.adversarial_loss!r}")
        check_discriminator_options(self.disc_width, self.disc_layers, self.disc_norm, prefix="disc_")
        parse_disc_augment(self.disc_augment)
        if not 0 < self.lecam_decay < 1:
            raise VQGenError(f"lecam_decay must be in (0, 1), got {self.lecam_decay}")
        if self.perceptual not in PERCEPTUAL_KINDS:
            raise VQGenError(f"perceptual must be one of {', '.join(PERCEPTUAL_KINDS)}, got {self.perceptual!r}")
        if not self.adversarial_weight:
            needs_d = [f"{name} {getattr(self, name)}" for name in ("lecam_weight", "r1_weight") if getattr(self, name)]
            if self.perceptual == "feature_matching" and self.perceptual_weight:
                needs_d.append("perceptual feature_matching")
            if needs_d:
                raise VQGenError(f"{needs_d[0]} needs the discriminator, which adversarial_weight 0 turns off")

    @property
    def adversarial(self) -> bool:
        return self.adversarial_weight > 0

    @property
    def augment_names(self) -> tuple[str, ...]:
        return parse_disc_augment(self.disc_augment)

    def discriminator_config(self, in_channels: int, height: int, width: int) -> DiscriminatorConfig:
        """The discriminator for images of this shape."""
        return DiscriminatorConfig(in_channels=in_channels, image_height=height, image_width=width,
                                   width=self.disc_width, layers=self.disc_layers, norm=self.disc_norm)


# -- the GAN losses -----------------------------------------------------------------------------
# Hinge is the default: VQGAN's choice and that of BigGAN and the LeCam paper, whose small-data results
# the regularisers here come from. Its discriminator loss stops pushing on patches it already classifies
# with a margin of 1, so an overconfident discriminator (the failure of small data) is not rewarded for
# growing its logits further; the generator's loss, -D(x'), is linear in the logits and its gradient
# never saturates. Non-saturating (Goodfellow et al. 2014; StyleGAN) is the log-loss alternative. Both
# discriminator losses average the real and the fake term (0.5 * (...)), as VQGAN does, so that an
# undecided discriminator (logits 0) scores 1 (hinge) or log 2 (non-saturating).

def d_hinge_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x'))))."""
    return 0.5 * (F.relu(1 - real_logits.float()).mean() + F.relu(1 + fake_logits.float()).mean())


def g_hinge_loss(fake_logits: Tensor) -> Tensor:
    """-mean(D(x'))."""
    return -fake_logits.float().mean()


def d_non_saturating_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """0.5 * (mean(-log sigmoid(D(x))) + mean(-log(1 - sigmoid(D(x'))))), via softplus."""
    return 0.5 * (F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean())


def g_non_saturating_loss(fake_logits: Tensor) -> Tensor:
    """mean(-log sigmoid(D(x')))."""
    return F.softplus(-fake_logits.float()).mean()


def gan_losses(kind: str) -> tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """(discriminator loss, generator loss) of `kind`."""
    if kind == "hinge":
        return d_hinge_loss, g_hinge_loss
    if kind == "non_saturating":
        return d_non_saturating_loss, g_non_saturating_loss
    raise VQGenError(f"adversarial_loss must be one of {', '.join(GAN_LOSSES)}, got {kind!r}")


def d_accuracy(real_logits: Tensor, fake_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Share of real patches judged real (logit > 0) and of fake patches judged fake, detached, on the device."""
    return (real_logits.detach() > 0).float().mean(), (fake_logits.detach() < 0).float().mean()


# -- VQGAN's adaptive weight -------------------------------------------------------------------

def decoder_last_layer(model: VQVAE) -> nn.Parameter:
    """The weight of the decoder's last layer (paper: the last transposed conv; resnet: the conv before the
    pixel shuffle), where the adaptive weight compares the two gradients."""
    decoder = model.decoder
    if isinstance(decoder, ResnetDecoder):
        return decoder.conv_out[-1].weight
    if isinstance(decoder, Decoder):
        return decoder.net[-1].weight
    raise VQGenError(f"no last layer known for a decoder of type {type(decoder).__name__}")


def adaptive_weight(rec_loss: Tensor, adv_loss: Tensor, last_layer_weight: Tensor, base_weight: float = 1.0,
                    max_weight: float = 1e4, eps: float = 1e-4, loss_scale: float | Tensor = 1.0) -> Tensor:
    """base_weight * clamp(||grad_W rec_loss|| / (||grad_W adv_loss|| + eps), 0, max_weight), detached,
    W the decoder's last layer: the adversarial gradient is brought to the size of the reconstruction's.

    Both graphs are kept (retain_graph) for the backward pass of the full loss. `loss_scale`: the gradient
    scaler's factor under fp16 (both losses are scaled before differentiating so that small gradients do
    not underflow, and the norms unscaled: the ratio does not change). No sync with the host."""
    rec_grad, = torch.autograd.grad(rec_loss * loss_scale, last_layer_weight, retain_graph=True)
    adv_grad, = torch.autograd.grad(adv_loss * loss_scale, last_layer_weight, retain_graph=True)
    ratio = (rec_grad.float().norm() / loss_scale) / (adv_grad.float().norm() / loss_scale + eps)
    return (ratio.clamp(0, max_weight) * base_weight).detach()


# -- regularisers of the discriminator ---------------------------------------------------------

def r1_from_logits(real_logits: Tensor, real: Tensor) -> Tensor:
    """mean over images of ||grad_x s(x)||^2, s(x) the mean of the image's patch logits (Mescheder et al.
    2018): `real_logits` (b, ...) computed from `real` (b, c, H, W), which must require grad. Differentiable
    in the discriminator's weights (create_graph), so one forward serves the loss and the penalty."""
    scores = real_logits.float().flatten(1).mean(dim=1)  # (b,)
    grad, = torch.autograd.grad(scores.sum(), real, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(dim=1).mean()


def r1_penalty(discriminator: Callable[[Tensor], Tensor], real: Tensor) -> Tensor:
    """`r1_from_logits` at the real images (b, c, H, W), with a forward pass of its own."""
    real = real.detach().requires_grad_(True)
    return r1_from_logits(discriminator(real), real)


class LeCam(nn.Module):
    """LeCam regularisation (Yu et al. 2021): mean(relu(D(x) - a_fake)^2) + mean(relu(a_real - D(x'))^2),
    as the authors' code writes it (their paper's Eq. 3 without the relu). a_real, a_fake: bias-corrected
    moving averages of the mean logits on reals and fakes, so the discriminator is pulled back towards its
    own history whenever it separates the two further than that.

    The state is three tensors (buffers: in `state_dict`, saved and resumed with the discriminator); with
    several processes pass `reduce` (e.g. a mean over processes) so that every copy keeps the same averages."""

    def __init__(self, decay: float = 0.99):
        super().__init__()
        if not 0 < decay < 1:
            raise VQGenError(f"lecam_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("real_average", torch.zeros(()))
        self.register_buffer("fake_average", torch.zeros(()))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, real_logits: Tensor, fake_logits: Tensor,
               reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        means = torch.stack([real_logits.detach().float().mean(), fake_logits.detach().float().mean()])
        if reduce is not None:
            means = reduce(means)
        self.real_average.mul_(self.decay).add_(means[0], alpha=1 - self.decay)
        self.fake_average.mul_(self.decay).add_(means[1], alpha=1 - self.decay)
        self.updates.add_(1)

    def anchors(self) -> tuple[Tensor, Tensor]:
        """The bias-corrected averages (real, fake); 0 before any update."""
        correction = 1 - torch.tensor(self.decay, dtype=torch.float64, device=self.updates.device) ** self.updates
        correction = correction.float().clamp(min=1e-12)
        return self.real_average / correction, self.fake_average / correction

    def forward(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        real_anchor, fake_anchor = self.anchors()
        return (F.relu(real_logits.float() - fake_anchor).pow(2).mean()
                + F.relu(real_anchor - fake_logits.float()).pow(2).mean())


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Within: the module's parameters need no gradient (the generator's pass through the discriminator
    leaves nothing in its .grad and builds no graph for its weights); after: as they were."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
