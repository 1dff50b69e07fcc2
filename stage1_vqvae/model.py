"""The VQ-VAE: convolutional encoder, vector quantizer, convolutional decoder.

The encoder and decoder here are the paper's convnet (architecture "paper"); the scalable trunk for
larger images (architecture "resnet") lives in `stage1_vqvae.trunk`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from stage1_vqvae.config import VQVAEConfig
from stage1_vqvae.quantizer import QuantizerOutput, VectorQuantizer
from stage1_vqvae.trunk import ResnetDecoder, ResnetEncoder
from vqgen.core.runtime.errors import VQGenError


def kmeans_sample_note(cfg: VQVAEConfig, batch_size: int) -> str | None:
    """The k-means initialisation clusters one process's first batch, batch_size * h * w vectors. Fewer
    than K: the line to log (the surplus codes start as repeats, which the restarts replace); refused
    when restarts are off, since a repeat is never chosen and would stay unused for good."""
    h, w = cfg.grid_shape
    vectors, k = batch_size * h * w, cfg.codebook_size
    if not cfg.kmeans_init or vectors >= k:
        return None
    if cfg.restart_after == 0:
        raise VQGenError(f"codebook_size {k} is larger than the {vectors} vectors of a batch ({batch_size} images x "
                         f"{h}x{w}) that k-means initialises it from, and restart_after is 0: raise the batch size "
                         f"to {-(-k // (h * w))}, restart codes (restart_after > 0) or turn off kmeans_init")
    return (f"k-means initialises {vectors} of the {k} codes from the first batch ({batch_size} images x {h}x{w}); "
            f"the other {k - vectors} start as repeats and are restarted from encoder outputs after "
            f"{cfg.restart_after} unused steps")


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))), as in the paper."""

    def __init__(self, channels: int, res_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, res_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(res_channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class Encoder(nn.Module):
    """(b, c, H, W) -> (b, d, H/f, W/f): strided 4x4 convs, a 3x3 conv, residual blocks, 1x1 to d."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        n_down = int(math.log2(cfg.downsample))
        ch = cfg.hidden_channels
        layers: list[nn.Module] = []
        in_ch = cfg.in_channels
        for i in range(n_down):
            out_ch = ch // 2 if i < n_down - 1 else ch
            layers += [nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1), nn.ReLU()]
            in_ch = out_ch
        layers.append(nn.Conv2d(ch, ch, 3, padding=1))
        layers += [ResBlock(ch, cfg.res_channels) for _ in range(cfg.num_res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(ch, cfg.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """(b, d, h, w) -> (b, c, h*f, w*f): a 3x3 conv, residual blocks, strided 4x4 transposed convs."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        n_up = int(math.log2(cfg.downsample))
        ch = cfg.hidden_channels
        layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, ch, 3, padding=1)]
        layers += [ResBlock(ch, cfg.res_channels) for _ in range(cfg.num_res_blocks)]
        layers.append(nn.ReLU())
        in_ch = ch
        for i in range(n_up):
            last = i == n_up - 1
            out_ch = cfg.in_channels if last else ch // 2
            layers.append(nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1))
            if not last:
                layers.append(nn.ReLU())
            in_ch = out_ch
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


def build_encoder(cfg: VQVAEConfig) -> nn.Module:
    """The encoder of `cfg.architecture`: (b, c, H, W) -> (b, d, H/f, W/f)."""
    if cfg.architecture == "resnet":
        return ResnetEncoder(cfg.in_channels, cfg.hidden_channels, cfg.level_mults, cfg.num_res_blocks,
                             cfg.attention, cfg.code_dim, cfg.linear_path, cfg.patch_size)
    return Encoder(cfg)


def build_decoder(cfg: VQVAEConfig) -> nn.Module:
    """The decoder of `cfg.architecture`: (b, d, h, w) -> (b, c, h*f, w*f)."""
    if cfg.architecture == "resnet":
        return ResnetDecoder(cfg.in_channels, cfg.hidden_channels, cfg.level_mults, cfg.num_res_blocks,
                             cfg.attention, cfg.code_dim, cfg.linear_path, cfg.patch_size)
    return Decoder(cfg)


@dataclass
class VQVAEOutput:
    recon: Tensor         # (b, c, H, W) in the data range [-1, 1] (not clamped)
    loss: Tensor          # reconstruction + codebook + beta * commitment
    recon_loss: Tensor
    quant: QuantizerOutput


class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = build_encoder(cfg)
        self.quantizer = VectorQuantizer(
            cfg.codebook_size,
            cfg.code_dim,
            beta=cfg.beta,
            update=cfg.codebook_update,
            ema_decay=cfg.ema_decay,
            kmeans_init=cfg.kmeans_init,
            restart_after=cfg.restart_after,
            lookup_dim=cfg.code_lookup_dim,
        )
        self.decoder = build_decoder(cfg)

    def forward(self, x: Tensor) -> VQVAEOutput:
        """(b, c, H, W) images in [-1, 1] -> reconstruction, losses and codes."""
        self._check_input(x)
        quant = self.quantizer(self.encoder(x))
        recon = self.decoder(quant.z_q)
        recon_loss = F.mse_loss(recon.float(), x.float())
        return VQVAEOutput(recon=recon, loss=recon_loss + quant.loss, recon_loss=recon_loss, quant=quant)

    def encode(self, x: Tensor) -> Tensor:
        """(b, c, H, W) -> (b, h, w) int64 codes."""
        self._check_input(x)
        return self.quantizer(self.encoder(x)).indices

    def decode(self, indices: Tensor) -> Tensor:
        """(b, h, w) codes -> (b, c, H, W) images in [-1, 1] (not clamped)."""
        k = self.config.codebook_size
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= k):
            raise VQGenError(f"codes must lie in [0, {k}), got values in [{int(indices.min())}, {int(indices.max())}]")
        return self.decoder(self.quantizer.decode_indices(indices))

    def compile_targets(self) -> list[nn.Module]:
        """What `--compile` compiles: the convolutional encoder and decoder. The quantizer stays eager: its
        k-means start and code restarts are data-dependent branches that would only break the graph."""
        return [self.encoder, self.decoder]

    def _check_input(self, x: Tensor) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise VQGenError(f"expected images (b, {cfg.in_channels}, h, w), got shape {tuple(x.shape)}")
        if x.shape[2] % cfg.downsample or x.shape[3] % cfg.downsample:
            raise VQGenError(
                f"image size {x.shape[2]}x{x.shape[3]} is not divisible by the downsampling factor {cfg.downsample}"
            )


def reconstruction_errors(model: VQVAE, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(b, c, H, W) in [-1, 1] -> per-image MSE on [0, 1] pixels (b,), the reconstructions clamped to
    [-1, 1] (b, c, H, W) and the codes (b, h, w): one encoder and one decoder pass."""
    out = model(images)
    recon = out.recon.float().clamp(-1, 1)
    mse = ((recon - images.float()) / 2).pow(2).flatten(1).mean(1)
    return mse, recon, out.quant.indices
