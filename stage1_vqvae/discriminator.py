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

from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from stage1_vqvae.config import DiscriminatorConfig
from stage1_vqvae.trunk import group_norm

MAX_MULT = 8  # the width stops doubling at 8 * width, as in pix2pix












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
