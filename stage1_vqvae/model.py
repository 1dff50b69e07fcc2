"""The VQ-VAE: convolutional encoder, vector quantizer, convolutional decoder.

The encoder and decoder here are the paper's convnet (architecture "paper"); the scalable trunk for
larger images (architecture "resnet") lives in `stage1_vqvae.trunk`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from stage1_vqvae.quantizer import QuantizerOutput, VectorQuantizer
from stage1_vqvae.trunk import ResnetDecoder, ResnetEncoder
from vqgen.core.codes import MAX_CODEBOOK_SIZE
from vqgen.core.config import option
from vqgen.core.errors import VQGenError

CODEBOOK_UPDATES = ("loss", "ema")
ARCHITECTURES = ("paper", "resnet")


def trunk_levels(downsample: int, patch_size: int = 1) -> int:
    """The resnet trunk's levels: one more than the halvings of downsample left after the patch fold."""
    return (downsample // patch_size).bit_length()


@dataclass(frozen=True)
class VQVAEConfig:
    """Architecture of the VQ-VAE: image shape (from the data), trunk, codebook and its upkeep."""

    in_channels: int = option(3, "image channels, from the data")
    image_height: int = option(32, "image height, from the data")
    image_width: int = option(32, "image width, from the data")
    hidden_channels: int = option(64, "channels of the encoder and decoder trunk (resnet: of its first level)")
    res_channels: int = option(32, "bottleneck channels inside a residual block (paper)")
    num_res_blocks: int = option(2, "residual blocks in the encoder and in the decoder (resnet: per level)")
    downsample: int = option(4, "image side / code grid side, a power of two (32x32 -> 8x8 at 4)")
    architecture: str = option("paper", "encoder/decoder trunk: paper: the paper's convnet (ReLU residual "
                               "blocks at one width); resnet: levels of GroupNorm+SiLU residual blocks, one per "
                               "halving, for larger images", choices=ARCHITECTURES, since=3)
    channel_mult: tuple[int, ...] = option((), "resnet: width of each level as a multiple of hidden_channels, "
                                           "one level more than the halvings of downsample (1,2,2 at 4; "
                                           "1,2,2,4 at 8); empty: doubling every second level, at most 4",
                                           since=3)
    attention: bool = option(False, "resnet: self-attention at the lowest resolution", since=3)
    patch_size: int = option(1, "resnet: fold each p x p pixel patch into channels before the first level and "
                             "unfold it after the last (pixel unshuffle/shuffle), so no conv runs at full "
                             "resolution; a power of two up to downsample, which it takes halvings from "
                             "(1: off)", since=5)
    linear_path: bool = option(True, "resnet: a linear path beside the trunk for each code's average colour "
                               "(so colours unseen in training reconstruct); runs saved before it load without",
                               since=4, legacy=False)
    codebook_size: int = option(512, "number of codes K")
    code_dim: int = option(64, "dimension d of a code vector")
    beta: float = option(0.25, "commitment weight, on ||z_e - sg[e]||^2")
    codebook_update: str = option("loss", "loss: the codebook term ||sg[z_e] - e||^2 moves the codes; "
                                  "ema: exponential moving averages of their assigned vectors",
                                  choices=CODEBOOK_UPDATES)
    ema_decay: float = option(0.99, "decay of the moving averages (--codebook-update ema)")
    kmeans_init: bool = option(True, "initialise the codebook by k-means on the first batch")
    restart_after: int = option(20, "restart codes unused for this many steps from encoder outputs (0: never)")
    code_lookup_dim: int = option(0, "factorised codes: search the K codes among l2-normalised vectors of this "
                                  "dimension (z_e projected down; nearest by cosine), the chosen code projected "
                                  "back up to code_dim; keeps usage high at large K (8 or 32; 0: off, search in "
                                  "code_dim)", since=3)

    def __post_init__(self):
        positive = ("in_channels", "image_height", "image_width", "hidden_channels", "res_channels", "code_dim")
        for name in positive:
            if getattr(self, name) < 1:
                raise VQGenError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_res_blocks < 0:
            raise VQGenError(f"num_res_blocks must be >= 0, got {self.num_res_blocks}")
        if not 2 <= self.codebook_size <= MAX_CODEBOOK_SIZE:
            raise VQGenError(f"codebook_size must be in [2, {MAX_CODEBOOK_SIZE}] (codes are stored as int16), "
                             f"got {self.codebook_size}")
        if self.downsample < 2 or self.downsample & (self.downsample - 1):
            raise VQGenError(f"downsample must be a power of two >= 2, got {self.downsample}")
        for name in ("image_height", "image_width"):
            if getattr(self, name) % self.downsample:
                raise VQGenError(
                    f"image {name.split('_')[1]} {getattr(self, name)} is not divisible by the downsampling "
                    f"factor {self.downsample} (resize with image_size or change downsample)"
                )
        self._check_trunk()
        if self.codebook_update not in CODEBOOK_UPDATES:
            raise VQGenError(f"codebook_update must be one of {CODEBOOK_UPDATES}, got {self.codebook_update!r}")
        if not 0 < self.beta:
            raise VQGenError(f"beta must be > 0, got {self.beta}")
        if not 0 < self.ema_decay < 1:
            raise VQGenError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.restart_after < 0:
            raise VQGenError(f"restart_after must be >= 0, got {self.restart_after}")
        if self.code_lookup_dim and not 2 <= self.code_lookup_dim <= self.code_dim:
            raise VQGenError(f"code_lookup_dim must be 0 (off) or in [2, code_dim={self.code_dim}], "
                             f"got {self.code_lookup_dim}")

    def _check_trunk(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise VQGenError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        mults = ",".join(map(str, self.channel_mult))
        if self.architecture == "paper":
            if self.channel_mult:
                raise VQGenError(f"channel_mult {mults} applies to architecture resnet only, got architecture paper")
            if self.attention:
                raise VQGenError("attention applies to architecture resnet only, got architecture paper")
            if self.patch_size != 1:
                raise VQGenError(f"patch_size {self.patch_size} applies to architecture resnet only, "
                                 "got architecture paper")
            return
        if self.patch_size < 1 or self.patch_size & (self.patch_size - 1) or self.patch_size > self.downsample:
            raise VQGenError(f"patch_size must be a power of two from 1 to downsample={self.downsample}, "
                             f"got {self.patch_size}")
        if any(m < 1 for m in self.channel_mult):
            raise VQGenError(f"channel_mult must hold integers >= 1, got {mults}")
        levels = self.trunk_levels
        if self.channel_mult and len(self.channel_mult) != levels:
            patch = f" with patch_size {self.patch_size}" if self.patch_size > 1 else ""
            raise VQGenError(
                f"channel_mult {mults} has {len(self.channel_mult)} levels but downsample {self.downsample}{patch} "
                f"needs {levels} (one more than its {levels - 1} halvings)"
            )

    @property
    def trunk_levels(self) -> int:
        return trunk_levels(self.downsample, self.patch_size)

    @property
    def level_mults(self) -> tuple[int, ...]:
        """The resnet trunk's width multiplier per level: channel_mult, or 1, 2, 2, 4, 4, ... when empty."""
        return self.channel_mult or tuple(min(2 ** ((i + 1) // 2), 4) for i in range(self.trunk_levels))

    @property
    def grid_shape(self) -> tuple[int, int]:
        return self.image_height // self.downsample, self.image_width // self.downsample


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
