"""Stage 1's options, without torch (the command-line parsers read them): the VQ-VAE's architecture
(`VQVAEConfig`, saved beside its weights as config.json), the presets by image side, and the training defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store.configs import option
from vqgen.core.store.layout import MAX_CODEBOOK_SIZE

CODEBOOK_UPDATES = ("loss", "ema")
ARCHITECTURES = ("paper", "resnet")


def trunk_levels(downsample: int, patch_size: int = 1) -> int:
    """The resnet trunk's levels: one more than the halvings of downsample left after the patch fold."""
    return (downsample // patch_size).bit_length()


def check_grid(downsample: int, height: int, width: int) -> None:
    """The downsampling factor is a power of two that divides both sides of the image."""
    if downsample < 2 or downsample & (downsample - 1):
        raise VQGenError(f"downsample must be a power of two >= 2, got {downsample}")
    for name, side in (("height", height), ("width", width)):
        if side % downsample:
            raise VQGenError(f"image {name} {side} is not divisible by the downsampling factor {downsample} "
                             "(resize with image_size or change downsample)")


def check_trunk(architecture: str, channel_mult: tuple[int, ...], attention: bool, patch_size: int,
                downsample: int) -> None:
    """The trunk's options fit together: resnet-only options on a resnet, one width per level, a patch fold that
    takes whole halvings of the downsampling."""
    if architecture not in ARCHITECTURES:
        raise VQGenError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}")
    mults = ",".join(map(str, channel_mult))
    if architecture == "paper":
        if channel_mult:
            raise VQGenError(f"channel_mult {mults} applies to architecture resnet only, got architecture paper")
        if attention:
            raise VQGenError("attention applies to architecture resnet only, got architecture paper")
        if patch_size != 1:
            raise VQGenError(f"patch_size {patch_size} applies to architecture resnet only, got architecture paper")
        return
    if patch_size < 1 or patch_size & (patch_size - 1) or patch_size > downsample:
        raise VQGenError(f"patch_size must be a power of two from 1 to downsample={downsample}, got {patch_size}")
    if any(m < 1 for m in channel_mult):
        raise VQGenError(f"channel_mult must hold integers >= 1, got {mults}")
    levels = trunk_levels(downsample, patch_size)
    if channel_mult and len(channel_mult) != levels:
        patch = f" with patch_size {patch_size}" if patch_size > 1 else ""
        raise VQGenError(f"channel_mult {mults} has {len(channel_mult)} levels but downsample {downsample}{patch} "
                         f"needs {levels} (one more than its {levels - 1} halvings)")


def check_side_options(options: dict[str, Any], height: int, width: int) -> None:
    """The checks of `VQVAEConfig` that depend on the image's side, run on the given model options (the rest at
    their defaults) before any image is decoded: a large folder takes minutes to convert."""
    value = {f.name: options.get(f.name, f.default) for f in fields(VQVAEConfig)}
    check_grid(value["downsample"], height, width)
    check_trunk(value["architecture"], value["channel_mult"], value["attention"], value["patch_size"],
                value["downsample"])


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
        check_grid(self.downsample, self.image_height, self.image_width)
        check_trunk(self.architecture, self.channel_mult, self.attention, self.patch_size, self.downsample)
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


# Stage-1 training defaults, chosen by measurement (docs/defaults.md); any option overrides them. Batch 32 at
# lr 2e-3: for the same images, twice the updates of batch 64 at 1e-3, which a VQ-VAE turns into quality: MNIST
# reaches the test MSE of a public VQ-VAE's 512k images in 51k (0.00283 and 0.00290 on two seeds, against
# 0.00392 for 64 at 1e-3; docs/benchmarks.md "Stage 1 in 10x fewer images").
TRAIN_DEFAULTS = dict(batch_size=32, learning_rate=2e-3, max_steps=1000, warmup_steps=100, eval_every=500,
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


# -- the adversarial and perceptual stage 1 (off by default) ------------------------------------------

DISC_NORMS = ("group", "spectral", "none")


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

DISC_AUGMENTATIONS = ("color", "translation", "cutout")


def parse_disc_augment(spec: str) -> tuple[str, ...]:
    """"none" -> (); "color,cutout" -> ("color", "cutout"); unknown or repeated names are refused by name."""
    if spec.strip().lower() in ("none", ""):
        return ()
    names = tuple(n.strip().lower() for n in spec.split(","))
    for name in names:
        if name not in DISC_AUGMENTATIONS:
            raise VQGenError(f"disc_augment: unknown augmentation {name!r}; expected 'none' or a comma list of "
                             f"{', '.join(DISC_AUGMENTATIONS)}")
    if len(set(names)) != len(names):
        raise VQGenError(f"disc_augment: {spec!r} names an augmentation twice")
    return names

PERCEPTUAL_KINDS = ("lpips", "ssim", "ms_ssim", "feature_matching", "own_features")

GAN_LOSSES = ("hinge", "non_saturating")

SHARPNESS = ("auto", "on", "off")


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
                             "ssim, ms_ssim (no download), feature_matching (the discriminator's features, "
                             "from adversarial_start) or own_features (a small network trained on the run's own "
                             "images first, no download)", choices=PERCEPTUAL_KINDS)
    perceptual_weight: float = option(0.0, "weight of the perceptual term in the autoencoder's loss (0: off)")
    sharpness: str = option("auto", "judge sharpness: each test evaluation also scores the reconstructions' "
                            "in-domain FID in the features of the run's judge, and the kept weights are the lowest "
                            "FID within psnr_slack dB of the best test PSNR; off: test MSE alone; auto: on with an "
                            "adversarial or perceptual term", choices=SHARPNESS, since=7, legacy="off")
    psnr_slack: float = option(1.0, "with sharpness: how many dB of test PSNR below the best seen a kept "
                               "evaluation may give up for a lower FID", since=7)

    def __post_init__(self):
        for name in ("adversarial_weight", "disc_learning_rate", "lecam_weight", "r1_weight", "perceptual_weight",
                     "psnr_slack"):
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
        if self.sharpness not in SHARPNESS:
            raise VQGenError(f"sharpness must be one of {', '.join(SHARPNESS)}, got {self.sharpness!r}")
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
    def terms(self) -> bool:
        """Whether the autoencoder's loss has an adversarial or a perceptual term."""
        return self.adversarial or self.perceptual_weight > 0

    @property
    def judged(self) -> bool:
        """Whether stage 1's evaluations score sharpness and keep weights by it (`sharpness`)."""
        return self.sharpness == "on" or (self.sharpness == "auto" and self.terms)

    @property
    def augment_names(self) -> tuple[str, ...]:
        return parse_disc_augment(self.disc_augment)

    def discriminator_config(self, in_channels: int, height: int, width: int) -> DiscriminatorConfig:
        """The discriminator for images of this shape."""
        return DiscriminatorConfig(in_channels=in_channels, image_height=height, image_width=width,
                                   width=self.disc_width, layers=self.disc_layers, norm=self.disc_norm)
