"""Perceptual terms for stage 1: losses that reward sharp structure where the pixel MSE rewards blur.

Five kinds behind one interface, `perceptual_loss(kind)`: a module called as `loss(fake, real)` on
(b, c, H, W) images in [-1, 1] that returns a scalar to minimise.

- "lpips": LPIPS (Zhang et al. 2018) through the `lpips` package, whose VGG weights are downloaded once:
  the closest to what VQGAN trains with, refused in one line where it cannot be loaded.
- "ssim" and "ms_ssim": 1 - (multi-scale) structural similarity (Wang et al. 2003/2004), computed here in
  torch: no weights, so offline users get a structure-aware term too.
- "feature_matching": the L1 distance between the discriminator's intermediate features of the
  reconstruction and of the original (Salimans et al. 2016; pix2pixHD): no weights either, but it needs
  the discriminator, so it only makes sense with the adversarial term on.
- "own_features": LPIPS's distance without LPIPS's weights: unit-normalised feature maps of a small network
  trained on the run's own training images (`own_feature_net`), compared layer by layer. No download, no
  discriminator; the network is trained before stage 1 and saved in the run (RUN/vqvae/perceptual_net).
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stage1_vqvae.config import PERCEPTUAL_KINDS
from vqgen.core.data.images import ImageData
from vqgen.core.evaluate import quality
from vqgen.core.evaluate.quality import Judge, JudgeConfig, judging_images, load_judge, train_judge
from vqgen.core.runtime.errors import VQGenError, one_line
from vqgen.core.store.layout import ModelDir

LPIPS_HELP = "pip install lpips, with network access once for the torchvision VGG weights it loads"
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, finest scale first
WINDOW, SIGMA = 11, 1.5  # the Gaussian window of Wang et al. 2004
DATA_RANGE = 2.0  # images in [-1, 1]
# The run's judge (`vqgen eval`, stage 1's sharpness) is seed 0 and learns the labels where there are any; the
# network behind own_features learns rotations (labelled or not) from seed 1, so the features a run trains
# towards are not the features it is scored in.
OWN_FEATURES_SEED = 1


# -- SSIM ---------------------------------------------------------------------------------------

def window_size(side: int) -> int:
    """The Gaussian window: 11 pixels, or the largest odd size that fits a smaller image."""
    return min(WINDOW, side if side % 2 else side - 1)


def gaussian_window(size: int, sigma: float = SIGMA) -> Tensor:
    """(size,) float32 weights of a normalised 1-d Gaussian centred on the middle tap."""
    offsets = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    weights = torch.exp(-(offsets / sigma) ** 2 / 2)
    return weights / weights.sum()


def _blur(x: Tensor, window: Tensor) -> Tensor:
    """(b, c, h, w) -> (b, c, h - s + 1, w - s + 1): the separable Gaussian, each channel alone, no padding."""
    c, s = x.shape[1], window.numel()
    x = F.conv2d(x, window.reshape(1, 1, s, 1).expand(c, 1, s, 1), groups=c)
    return F.conv2d(x, window.reshape(1, 1, 1, s).expand(c, 1, 1, s), groups=c)


def ssim_parts(x: Tensor, y: Tensor, data_range: float = DATA_RANGE) -> tuple[Tensor, Tensor]:
    """(b, c, h, w) twice -> SSIM and its contrast-structure part, each averaged over the map, (b, c)."""
    window = gaussian_window(window_size(min(x.shape[-2:])), SIGMA).to(x.device, x.dtype)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = _blur(x, window), _blur(y, window)
    var_x = _blur(x * x, window) - mu_x ** 2
    var_y = _blur(y * y, window) - mu_y ** 2
    cov = _blur(x * y, window) - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1)
    return (luminance * cs).mean(dim=(2, 3)), cs.mean(dim=(2, 3))


def _checked_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if x.shape != y.shape or x.ndim != 4:
        raise VQGenError(f"SSIM compares two (b, c, h, w) batches of one shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.to(dtype), y.to(dtype)


def ssim(x: Tensor, y: Tensor, data_range: float = DATA_RANGE) -> Tensor:
    """(b, c, h, w) twice -> (b,) structural similarity, 1 for identical images, averaged over channels.

    Computed in float32 (float64 input stays so) with autocast off: the variances are differences of
    means of squares, which half precision would cancel away."""
    x, y = _checked_pair(x, y)
    with torch.autocast(x.device.type, enabled=False):
        return ssim_parts(x, y, data_range)[0].mean(dim=1)


def ms_ssim_scales(height: int, width: int) -> int:
    """How many of the five scales fit: each halves the image, and the coarsest must still hold an 11-px window."""
    side, scales = min(height, width), 1
    while scales < len(MS_SSIM_WEIGHTS) and side // 2 ** scales >= WINDOW:
        scales += 1
    return scales


def ms_ssim(x: Tensor, y: Tensor, data_range: float = DATA_RANGE) -> Tensor:
    """(b, c, h, w) twice -> (b,) multi-scale SSIM: prod_j cs_j^w_j * ssim_M^w_M over the scales that fit
    (`ms_ssim_scales`), their weights renormalised to sum to 1, so small images keep a meaningful value.

    cs and SSIM are clamped to >= 1e-6 before the fractional powers (they can be negative for images that
    differ a lot, and the power's gradient is infinite at 0)."""
    x, y = _checked_pair(x, y)
    scales = ms_ssim_scales(*x.shape[-2:])
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=x.dtype, device=x.device)
    weights = weights / weights.sum()
    with torch.autocast(x.device.type, enabled=False):
        factors = []
        for j in range(scales):
            full, cs = ssim_parts(x, y, data_range)  # (b, c) each
            factors.append((full if j == scales - 1 else cs).clamp(min=1e-6) ** weights[j])
            if j < scales - 1:
                x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        return torch.stack(factors).prod(dim=0).mean(dim=1)  # (scales, b, c) -> (b,)


class SSIMLoss(nn.Module):
    """1 - SSIM (or MS-SSIM when `multiscale`), averaged over the batch."""

    def __init__(self, multiscale: bool):
        super().__init__()
        self.multiscale = multiscale

    def forward(self, fake: Tensor, real: Tensor) -> Tensor:
        score = ms_ssim(fake, real) if self.multiscale else ssim(fake, real)
        return 1 - score.mean()


# -- LPIPS --------------------------------------------------------------------------------------

class LPIPSLoss(nn.Module):
    """LPIPS (VGG) of the `lpips` package, frozen and always in eval mode, averaged over the batch.

    Grey images are repeated to three channels. Its weights are no part of the stage's weights or state."""

    def __init__(self):
        super().__init__()
        if importlib.util.find_spec("lpips") is None:
            raise VQGenError(f"the perceptual loss lpips needs the lpips package and its weights: {LPIPS_HELP}; "
                             "or train with perceptual ms_ssim, which needs no download")
        try:
            import lpips

            net = lpips.LPIPS(net="vgg", verbose=False)
        except Exception as err:  # most often: no network to download the VGG weights on first use
            raise VQGenError(f"LPIPS could not be loaded ({one_line(err)}): {LPIPS_HELP}") from None
        self.net = net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> LPIPSLoss:
        return super().train(False)  # its dropout stays off: a loss, not a model being trained

    def forward(self, fake: Tensor, real: Tensor) -> Tensor:
        if fake.shape[1] == 1:
            fake, real = fake.expand(-1, 3, -1, -1), real.expand(-1, 3, -1, -1)
        return self.net(fake, real).mean()


# -- feature matching -------------------------------------------------------------------------

def feature_matching_loss(fake_features: list[Tensor], real_features: list[Tensor]) -> Tensor:
    """Mean over the intermediate layers (all but the last, the logits) of the L1 distance between the
    features of the fakes and of the reals; the reals' are detached: only the fakes move."""
    if len(fake_features) != len(real_features) or len(fake_features) < 2:
        raise VQGenError(f"feature matching needs the same number (>= 2) of feature maps for fake and real, got "
                         f"{len(fake_features)} and {len(real_features)}")
    pairs = list(zip(fake_features[:-1], real_features[:-1]))
    return torch.stack([F.l1_loss(f.float(), r.detach().float()) for f, r in pairs]).mean()


class FeatureMatchingLoss(nn.Module):
    """`feature_matching_loss` over `features(x)` (e.g. `PatchDiscriminator.features`).

    The callable is held as a plain attribute, so the discriminator's weights do not become this
    module's: they stay in the discriminator alone, which trains and saves them."""

    def __init__(self, features: Callable[[Tensor], list[Tensor]]):
        super().__init__()
        self.features = features

    def forward(self, fake: Tensor, real: Tensor) -> Tensor:
        return feature_matching_loss(self.features(fake), self.features(real))


# -- features of a network trained on the run's own images ------------------------------------------

def own_feature_net(folder: ModelDir, data: ImageData, device: torch.device | str, load: bool) -> tuple[Judge, bool]:
    """The network behind perceptual own_features and whether it was loaded: the one saved in `folder` when
    `load` (a resumed run) and there is one, else a judge-sized CNN trained on the training images' rotations
    (JUDGE_STEPS steps, OWN_FEATURES_SEED; bit-identical per seed on the CPU). Nothing is written here: the
    caller saves a trained one (`save_judge`) once the stage's configs are."""
    if load and folder.trained:
        return load_judge(folder.path).to(device), True
    images, _ = judging_images(data.train, seed=0)
    config = JudgeConfig.for_data(images, None, steps=quality.JUDGE_STEPS, seed=OWN_FEATURES_SEED)
    return train_judge(images.to(device), None, config), False


def _unit(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Each position's feature vector scaled to unit length (LPIPS's channel normalisation)."""
    return x / (x.norm(dim=1, keepdim=True) + eps)


def own_features_distance(net: Judge, fake: Tensor, real: Tensor) -> Tensor:
    """Mean over the net's stages of the squared distance between the unit-normalised feature maps of the fakes
    and of the reals, summed over channels and averaged over positions and the batch (LPIPS with equal weights
    for every channel). The reals' features carry no gradient: only the fakes move."""
    terms = []
    f, r = fake, real.detach()
    for stage in net.body:
        f = stage(f)
        with torch.no_grad():
            r = stage(r)
        terms.append((_unit(f.float()) - _unit(r.float())).pow(2).sum(dim=1).mean())
    return torch.stack(terms).mean()


class OwnFeaturesLoss(nn.Module):
    """`own_features_distance` in a frozen net that stays in eval mode (it is a loss, not a model being trained);
    its weights are saved apart (RUN/vqvae/perceptual_net), not in the stage's state."""

    def __init__(self, net: Judge):
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> OwnFeaturesLoss:
        return super().train(False)

    def forward(self, fake: Tensor, real: Tensor) -> Tensor:
        return own_features_distance(self.net, fake, real)


def perceptual_loss(kind: str, features: Callable[[Tensor], list[Tensor]] | None = None,
                    net: Judge | None = None) -> nn.Module:
    """The perceptual term `kind` as a module: `loss(fake, real)` -> scalar. "feature_matching" needs the
    discriminator's `features`, "own_features" the `net` of `own_feature_net`; "lpips" needs the lpips package
    and its weights (else one VQGenError line)."""
    if kind not in PERCEPTUAL_KINDS:
        raise VQGenError(f"perceptual must be one of {', '.join(PERCEPTUAL_KINDS)}, got {kind!r}")
    if kind == "lpips":
        return LPIPSLoss()
    if kind == "feature_matching":
        if features is None:
            raise VQGenError("perceptual feature_matching needs the discriminator's features (adversarial_weight > 0)")
        return FeatureMatchingLoss(features)
    if kind == "own_features":
        if net is None:
            raise VQGenError("perceptual own_features needs the network trained on the run's images (own_feature_net)")
        return OwnFeaturesLoss(net)
    return SSIMLoss(multiscale=kind == "ms_ssim")
