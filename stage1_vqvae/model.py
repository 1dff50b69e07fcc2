"""The VQ-VAE: convolutional encoder, vector quantizer, convolutional decoder."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from stage1_vqvae.quantizer import QuantizerOutput, VectorQuantizer
from vqgen.core.config import option
from vqgen.core.errors import VQGenError

CODEBOOK_UPDATES = ("loss", "ema")


@dataclass(frozen=True)
class VQVAEConfig:
    """Architecture of the VQ-VAE: image shape (from the data), trunk, codebook and its upkeep."""

    in_channels: int = option(3, "image channels, from the data")
    image_height: int = option(32, "image height, from the data")
    image_width: int = option(32, "image width, from the data")
    hidden_channels: int = option(64, "channels of the encoder and decoder trunk")
    res_channels: int = option(32, "bottleneck channels inside a residual block")
    num_res_blocks: int = option(2, "residual blocks in the encoder and in the decoder")
    downsample: int = option(4, "image side / code grid side, a power of two (32x32 -> 8x8 at 4)")
    codebook_size: int = option(512, "number of codes K")
    code_dim: int = option(64, "dimension d of a code vector")
    beta: float = option(0.25, "commitment weight, on ||z_e - sg[e]||^2")
    codebook_update: str = option("loss", "loss: the codebook term ||sg[z_e] - e||^2 moves the codes; "
                                  "ema: exponential moving averages of their assigned vectors",
                                  choices=CODEBOOK_UPDATES)
    ema_decay: float = option(0.99, "decay of the moving averages (--codebook-update ema)")
    kmeans_init: bool = option(True, "initialise the codebook by k-means on the first batch")
    restart_after: int = option(20, "restart codes unused for this many steps from encoder outputs (0: never)")

    def __post_init__(self):
        positive = ("in_channels", "image_height", "image_width", "hidden_channels", "res_channels", "code_dim")
        for name in positive:
            if getattr(self, name) < 1:
                raise VQGenError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_res_blocks < 0:
            raise VQGenError(f"num_res_blocks must be >= 0, got {self.num_res_blocks}")
        if self.codebook_size < 2:
            raise VQGenError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.downsample < 2 or self.downsample & (self.downsample - 1):
            raise VQGenError(f"downsample must be a power of two >= 2, got {self.downsample}")
        for name in ("image_height", "image_width"):
            if getattr(self, name) % self.downsample:
                raise VQGenError(
                    f"image {name.split('_')[1]} {getattr(self, name)} is not divisible by the downsampling "
                    f"factor {self.downsample} (resize with image_size or change downsample)"
                )
        if self.codebook_update not in CODEBOOK_UPDATES:
            raise VQGenError(f"codebook_update must be one of {CODEBOOK_UPDATES}, got {self.codebook_update!r}")
        if not 0 < self.beta:
            raise VQGenError(f"beta must be > 0, got {self.beta}")
        if not 0 < self.ema_decay < 1:
            raise VQGenError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.restart_after < 0:
            raise VQGenError(f"restart_after must be >= 0, got {self.restart_after}")

    @property
    def grid_shape(self) -> tuple[int, int]:
        return self.image_height // self.downsample, self.image_width // self.downsample


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
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(
            cfg.codebook_size,
            cfg.code_dim,
            beta=cfg.beta,
            update=cfg.codebook_update,
            ema_decay=cfg.ema_decay,
            kmeans_init=cfg.kmeans_init,
            restart_after=cfg.restart_after,
        )
        self.decoder = Decoder(cfg)

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
