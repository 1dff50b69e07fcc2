"""The patch discriminator of the adversarial stage 1 (PatchGAN, Isola et al. 2017, as VQGAN uses it).

A stack of 4x4 convs: `layers` of stride 2 (width, 2*width, 4*width, ... at most 8*width) and two of
stride 1, the last to one channel. Each output logit judges one patch of the image, so the discriminator
asks "is this patch real?" rather than "is this image real?": it sees texture and edges, which the MSE of
a VQ-VAE blurs, and leaves the layout to the reconstruction loss.

The number of strided layers comes from the image side, the way the resnet trunk's levels come from
`downsample`: the most whose receptive field still fits in half the shorter side, so every logit judges a
patch and there are several patches per image (3 layers, 70x70 patches, at 256 px as in pix2pix and VQGAN;
1 layer, 16x16 patches, at 32 px).

Normalisation: GroupNorm by default, never BatchNorm. BatchNorm's statistics mix the images of a batch:
with the small per-process batches of small data they are noisy, they differ between processes (unless
synchronised), the real and the fake batch get different statistics, and the R1 penalty, which must be a
per-image gradient, leaks across the batch. GroupNorm normalises each image on its own and keeps no
running state (its statistics span the whole image: a logit's convs see its patch, its normalisation the
image, as BatchNorm's would see the batch). "spectral" (Miyato et al. 2018) bounds each layer's Lipschitz
constant instead, at the cost of a power-iteration buffer per layer; "none" leaves the conv stack bare
(then lean on R1 or LeCam).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from stage1_vqvae.trunk import group_norm
from vqgen.core.store.configs import option
from vqgen.core.runtime.errors import VQGenError

DISC_NORMS = ("group", "spectral", "none")
MAX_MULT = 8  # the width stops doubling at 8 * width, as in pix2pix


def receptive_field(layers: int) -> int:
    """Side of the image patch one logit sees: `layers` stride-2 4x4 convs and two stride-1 4x4 convs.

    Walking back from one output pixel: each stride-1 4x4 conv adds 3, each stride-2 one maps r to 2r + 2."""
    r = 1 + 3 + 3
    for _ in range(layers):
        r = 2 * r + 2
    return r


def logits_side(side: int, layers: int) -> int:
    """The logit grid's side for an image side: each stride-2 conv (padding 1) halves it, rounding down,
    each stride-1 4x4 conv (padding 1) takes one off."""
    for _ in range(layers):
        side = side // 2
    return side - 2


def discriminator_layers(height: int, width: int) -> int:
    """Strided layers for an image: the most whose receptive field fits in half the shorter side (at least 1)."""
    half = min(height, width) // 2
    layers = 1
    while receptive_field(layers + 1) <= half and logits_side(min(height, width), layers + 1) >= 1:
        layers += 1
    return layers


def check_discriminator_options(width: int, layers: int, norm: str, prefix: str = "") -> None:
    """The discriminator options that do not depend on the image; `prefix` as the caller's fields are named."""
    if width < 1:
        raise VQGenError(f"{prefix}width must be >= 1, got {width}")
    if layers < 0:
        raise VQGenError(f"{prefix}layers must be >= 0 (0: from the image side), got {layers}")
    if norm not in DISC_NORMS:
        raise VQGenError(f"{prefix}norm must be one of {', '.join(DISC_NORMS)}, got {norm!r}")


@dataclass(frozen=True)
class DiscriminatorConfig:
    """Architecture of the patch discriminator: image shape (from the data), width, depth, normalisation."""

    in_channels: int = option(3, "image channels, from the data")
    image_height: int = option(32, "image height, from the data")
    image_width: int = option(32, "image width, from the data")
    width: int = option(64, "channels of the first conv; each strided layer doubles them, up to 8x")
    layers: int = option(0, "stride-2 conv layers (0: the most whose receptive field fits in half the shorter "
                            "image side: 1 at 32 px, 2 at 128, 3 at 256)")
    norm: str = option("group", "normalisation: group (GroupNorm, per image, after every conv but the first "
                       "and the last), spectral (every conv's weight divided by its spectral norm) or none "
                       "(never BatchNorm: it mixes the images of a batch)", choices=DISC_NORMS)

    def __post_init__(self):
        for name in ("in_channels", "image_height", "image_width"):
            if getattr(self, name) < 1:
                raise VQGenError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_discriminator_options(self.width, self.layers, self.norm)
        side = min(self.image_height, self.image_width)
        if logits_side(side, self.num_layers) < 1:
            fits = max((n for n in range(1, 16) if logits_side(side, n) >= 1), default=0)
            raise VQGenError(f"layers {self.num_layers} leaves no logit on {self.image_height}x{self.image_width} "
                             f"images: at most {fits} fit(s) (the patch discriminator needs a side of 6 px or more)")

    @property
    def num_layers(self) -> int:
        """The strided layers: `layers`, or the rule of `discriminator_layers` when 0."""
        return self.layers or discriminator_layers(self.image_height, self.image_width)

    @property
    def patch_size(self) -> int:
        """The side of the patch each logit judges."""
        return receptive_field(self.num_layers)


def _conv(in_ch: int, out_ch: int, stride: int, norm: str) -> nn.Module:
    conv = nn.Conv2d(in_ch, out_ch, 4, stride=stride, padding=1)
    return spectral_norm(conv) if norm == "spectral" else conv


def _block(in_ch: int, out_ch: int, stride: int, norm: str) -> nn.Sequential:
    """conv 4x4 -> GroupNorm (norm "group") -> LeakyReLU(0.2)."""
    parts = [_conv(in_ch, out_ch, stride, norm)]
    if norm == "group":
        parts.append(group_norm(out_ch))
    return nn.Sequential(*parts, nn.LeakyReLU(0.2))


class PatchDiscriminator(nn.Module):
    """(b, c, H, W) images in [-1, 1] -> (b, 1, h, w) logits, one per patch (h = H / 2^layers - 2)."""

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        self.config = cfg
        n, width = cfg.num_layers, cfg.width
        chs = [cfg.in_channels] + [width * min(2 ** i, MAX_MULT) for i in range(n + 1)]
        # the first block is never normalised: it would erase each image's own mean and contrast
        blocks = [_block(chs[0], chs[1], 2, "spectral" if cfg.norm == "spectral" else "none")]
        blocks += [_block(chs[i], chs[i + 1], 2, cfg.norm) for i in range(1, n)]
        blocks.append(_block(chs[n], chs[n + 1], 1, cfg.norm))
        self.blocks = nn.ModuleList(blocks)
        self.head = _conv(chs[n + 1], 1, 1, "spectral" if cfg.norm == "spectral" else "none")
        self.apply(_init)

    def features(self, x: Tensor) -> list[Tensor]:
        """The activations after each block, then the logits: what feature matching compares."""
        out = []
        for block in self.blocks:
            x = block(x)
            out.append(x)
        out.append(self.head(x))  # (b, 1, h, w)
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)[-1]


def _init(module: nn.Module) -> None:
    """DCGAN's initialisation (N(0, 0.02) convs), which pix2pix and VQGAN keep: small first logits."""
    if isinstance(module, nn.Conv2d):
        weight = module.parametrizations.weight.original if hasattr(module, "parametrizations") else module.weight
        nn.init.normal_(weight, 0.0, 0.02)
        nn.init.zeros_(module.bias)
