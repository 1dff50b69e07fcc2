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
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stage1_vqvae.config import GAN_LOSSES
from stage1_vqvae.model import VQVAE, Decoder
from stage1_vqvae.trunk import ResnetDecoder
from vqgen.core.runtime.errors import VQGenError

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
