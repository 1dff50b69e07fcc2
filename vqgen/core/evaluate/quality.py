"""Offline sample quality: a small judge CNN trained on the data itself, and the FID in its features.

Works for any uint8 image data (n, c, h, w) without downloads: `train_judge` learns the labels (or,
for unlabelled data, the rotation of each image), `sample_quality` reports the Fréchet distance of
samples to the real test images in the judge's features, class accuracy and class coverage, and
`reference_floor` what real training images score in the same measures; both compare with a
`Reference`, the test images' statistics computed once. `distribution_scores` adds KID, precision/recall
and density/coverage, `memorisation_scores` the share of near-copies of training images (both from
vqgen.core.evaluate.sample_metrics). The standard Inception measures are in
vqgen.core.evaluate.inception.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqgen.core.data.images import ImageData, ImageSplit
from vqgen.core.evaluate import sample_metrics
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store.layout import ModelDir
from vqgen.core.store.weights import load_model, save_model

TASKS = ("labels", "rotation")
ROTATIONS = 4  # 0, 90, 180, 270 degrees
SHIFT = 2  # pixels of random translation in training
JUDGING_IMAGES = 20_000  # of a streamed split, for the judge and the FID references
JUDGE_STEPS = 600  # the judge's training steps, as stage 1's sharpness evaluation trains it


# --- Fréchet distance ----------------------------------------------------------------


def _float64(x: Tensor | np.ndarray, what: str, ndim: int) -> Tensor:
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if t.ndim != ndim:
        raise VQGenError(f"{what} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise VQGenError(f"{what} holds NaN or infinite values")
    return t


def _sqrt_psd(s: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite (d, d) matrix."""
    vals, vecs = torch.linalg.eigh((s + s.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T  # rounding makes tiny eigenvalues negative


def frechet_distance(mu1: Tensor | np.ndarray, sigma1: Tensor | np.ndarray,
                     mu2: Tensor | np.ndarray, sigma2: Tensor | np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) of two Gaussians: means (d,), covariances (d, d)."""
    mu1, mu2 = _float64(mu1, "mu1", 1), _float64(mu2, "mu2", 1)
    s1, s2 = _float64(sigma1, "sigma1", 2), _float64(sigma2, "sigma2", 2)
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise VQGenError(f"Fréchet distance: shapes do not match: mu1 {tuple(mu1.shape)}, sigma1 {tuple(s1.shape)}, "
                         f"mu2 {tuple(mu2.shape)}, sigma2 {tuple(s2.shape)}")
    # Tr((S1 S2)^(1/2)) = Tr((R S2 R)^(1/2)) with R = S1^(1/2): a symmetric PSD matrix, so eigh is exact
    root = _sqrt_psd(s1)
    middle = root @ s2 @ root
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    value = float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * cross)
    return max(value, 0.0)  # a true distance; identical inputs can round to -1e-13


def feature_stats(features: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
    """(n, f) features -> float64 mean (f,) and unbiased covariance (f, f)."""
    x = _float64(features, "features", 2)
    if x.shape[0] < 2:
        raise VQGenError(f"feature statistics need at least 2 images, got {x.shape[0]}")
    return x.mean(0), torch.cov(x.T, correction=1).reshape(x.shape[1], x.shape[1])


def frechet_distance_of(features_a: Tensor | np.ndarray, features_b: Tensor | np.ndarray) -> float:
    """The Fréchet distance between Gaussians fitted to (n, f) and (m, f) features."""
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))


# --- the judge -----------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeConfig:
    """The judge's shape and its training. num_classes = 0: unlabelled data; task "labels" needs num_classes >= 2."""

    in_channels: int = 3
    image_height: int = 32
    image_width: int = 32
    num_classes: int = 0
    width: int = 32
    task: str = "rotation"
    steps: int = JUDGE_STEPS
    batch_size: int = 64
    learning_rate: float = 2e-3
    seed: int = 0

    def __post_init__(self):
        checks = [
            (self.in_channels in (1, 3), "in_channels", "1 or 3"),
            (min(self.image_height, self.image_width) >= 8, "image size",  "height and width >= 8"),
            (self.task in TASKS, "task", f"one of {TASKS}"),
            (self.num_classes >= (2 if self.task == "labels" else 0), "num_classes",
             ">= 2 for the labels task" if self.task == "labels" else ">= 0 (0 = unlabelled)"),
            (self.width >= 1, "width", ">= 1"),
            (self.steps >= 0, "steps", ">= 0"),
            (self.batch_size >= 1, "batch_size", ">= 1"),
            (math.isfinite(self.learning_rate) and self.learning_rate > 0, "learning_rate", "> 0"),
        ]
        for ok, name, expected in checks:
            if not ok:
                got = ((self.image_height, self.image_width) if name == "image size" else getattr(self, name))
                raise VQGenError(f"judge {name} must be {expected}, got {got!r}")

    @classmethod
    def for_data(cls, images: Tensor, labels: Tensor | None, num_classes: int | None = None,
                 **changes) -> JudgeConfig:
        """The config that fits uint8 (n, c, h, w) images: the labels task when labels are given."""
        check_images(images, "judge training images")
        if labels is not None and num_classes is None:
            num_classes = int(labels.max()) + 1 if labels.numel() else 0
        return cls(in_channels=images.shape[1], image_height=images.shape[2], image_width=images.shape[3],
                   num_classes=num_classes or 0, task="rotation" if labels is None else "labels", **changes)

    @property
    def outputs(self) -> int:
        return ROTATIONS if self.task == "rotation" else self.num_classes


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(min(8, cout), cout), nn.SiLU())


class Judge(nn.Module):
    """A small CNN: a stem, three stride-2 stages, global average pool, linear head. Input float [-1, 1]."""

    def __init__(self, config: JudgeConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.body = nn.Sequential(_stage(config.in_channels, w, 1), _stage(w, w, 2),
                                  _stage(w, 2 * w, 2), _stage(2 * w, 4 * w, 2))
        self.head = nn.Linear(4 * w, config.outputs)

    def features(self, x: Tensor) -> Tensor:
        """(n, c, h, w) in [-1, 1] -> (n, 4 * width)."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        """(n, c, h, w) in [-1, 1] -> logits (n, outputs)."""
        return self.head(self.features(x))


def check_images(images: Tensor, what: str, config: JudgeConfig | None = None) -> None:
    """Refuse anything but uint8 (n, c, h, w), and (c, h, w) other than the judge's."""
    ok = (isinstance(images, Tensor) and images.dtype == torch.uint8 and images.ndim == 4
          and images.shape[1] in (1, 3) and min(images.shape[2:]) >= 8 and images.shape[0] >= 1)
    if not ok:
        got = f"dtype {images.dtype}, shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images)
        raise VQGenError(f"{what} must be a uint8 tensor (n, c, h, w) with c 1 or 3 and h, w >= 8, got {got}")
    if config is not None and tuple(images.shape[1:]) != (config.in_channels, config.image_height,
                                                           config.image_width):
        raise VQGenError(f"{what} have shape (c, h, w) {tuple(images.shape[1:])}, the judge was trained on "
                         f"{(config.in_channels, config.image_height, config.image_width)}")


def _check_labels(labels: Tensor, n: int, classes: int, what: str) -> None:
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or tuple(labels.shape) != (n,):
        got = f"dtype {labels.dtype}, shape {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels)
        raise VQGenError(f"{what} must be an int64 tensor of shape ({n},), got {got}")
    if classes and n and (labels.min() < 0 or labels.max() >= classes):
        raise VQGenError(f"{what} must lie in [0, {classes}), got values {int(labels.min())}..{int(labels.max())}")


def _model_input(images: Tensor) -> Tensor:
    return images.float() / 127.5 - 1.0


def _square(x: Tensor) -> Tensor:
    """A centred square crop: rot90 of a non-square batch would change its shape."""
    h, w = x.shape[2:]
    s = min(h, w)
    return x[:, :, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]


def _rotate(x: Tensor, turns: Tensor) -> Tensor:
    """(b, c, s, s) rotated by turns (b,) quarter turns each."""
    out = x.clone()
    for k in range(1, ROTATIONS):
        pick = turns == k
        out[pick] = torch.rot90(x[pick], k, dims=(2, 3))
    return out


def _shift(x: Tensor, g: torch.Generator) -> Tensor:
    """Translate each image by up to SHIFT pixels (edge-padded); no flips, digits must stay digits."""
    b, c, h, w = x.shape
    padded = F.pad(x, (SHIFT,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * SHIFT + 1, (2, b), generator=g).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (b, 1, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (b, 1, 1, w)
    return padded[torch.arange(b, device=x.device)[:, None, None, None],
                  torch.arange(c, device=x.device)[None, :, None, None], rows, cols]


def train_judge(images: Tensor, labels: Tensor | None, config: JudgeConfig,
                progress: Callable[[int, float], None] | None = None) -> Judge:
    """Train a judge on uint8 (n, c, h, w) images and int64 labels (n,), or the rotation task when labels is None.

    Runs on the images' device; bit-identical per config.seed on CPU (cuDNN may vary slightly on CUDA).
    progress(step, loss) is called after every step.
    """
    if labels is None and config.task == "labels":
        config = dataclasses.replace(config, task="rotation", num_classes=0)  # unlabelled: learn rotations
    check_images(images, "judge training images", config)
    n = len(images)
    if labels is not None:
        _check_labels(labels, n, config.num_classes if config.task == "labels" else 0, "judge training labels")
        labels = labels.to(images.device)
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's RNG alone
        torch.manual_seed(config.seed)
        judge = Judge(config).to(images.device)
    g = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(judge.parameters(), lr=config.learning_rate)
    judge.train()
    order, at = torch.randperm(n, generator=g), 0
    for step in range(1, config.steps + 1):
        if at + config.batch_size > n and at > 0:  # a new epoch: every image once per epoch
            order, at = torch.randperm(n, generator=g), 0
        index = order[at:at + config.batch_size].to(images.device)
        at += config.batch_size
        x = _shift(_model_input(images[index]), g)
        if config.task == "rotation":
            target = torch.randint(0, ROTATIONS, (len(index),), generator=g).to(images.device)
            x = _rotate(_square(x), target)
        else:
            target = labels[index]
        loss = F.cross_entropy(judge(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress(step, float(loss.detach()))
    return judge.eval()


def save_judge(judge: Judge, folder: str | os.PathLike) -> str:
    """config.json + model.safetensors in `folder`; returns the weights' fingerprint."""
    return save_model(judge, judge.config, folder)


def load_judge(folder: str | os.PathLike) -> Judge:
    return load_model(Judge, JudgeConfig, folder).eval()


def judging_images(split: ImageSplit, seed: int) -> tuple[Tensor, Tensor | None]:
    """A split's images and labels for training the judge and as FID references: all of an in-memory
    split; of a streamed one (larger than memory), a seeded random JUDGING_IMAGES of them, in order."""
    if not split.streamed or len(split) <= JUDGING_IMAGES:
        return split.images, split.labels
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:JUDGING_IMAGES].sort().values
    return split.take(idx), None if split.labels is None else split.labels[idx]


def run_judge(folder: ModelDir, data: ImageData, device: torch.device | str = "cpu", retrain: bool = False,
              steps: int | None = None) -> Judge:
    """A run's judge: the one saved in `folder` where it fits the images' shape (unless `retrain`), else one
    trained on the training images (their labels, or rotations when unlabelled; `steps`, default JUDGE_STEPS)
    and saved there. Stage 1's sharpness evaluation and `vqgen eval` share it, so both score in the same
    features."""
    if folder.trained and not retrain:
        judge = load_judge(folder.path)
        if (judge.config.in_channels, judge.config.image_height, judge.config.image_width) == (
                data.channels, data.height, data.width):
            return judge.to(device)
    images, labels = judging_images(data.train, seed=0)
    images, labels = images.to(device), None if labels is None else labels.to(device)
    config = JudgeConfig.for_data(images, labels, data.num_classes or None, steps=steps or JUDGE_STEPS)
    judge = train_judge(images, labels, config)
    save_judge(judge, folder.path)
    return judge


# --- measures ------------------------------------------------------------------------


@torch.no_grad()
def _apply(judge: Judge, images: Tensor, fn: Callable[[Tensor], Tensor], batch_size: int) -> Tensor:
    """fn over uint8 (n, c, h, w) images in batches, on the judge's device, in eval mode -> CPU (n, ...)."""
    device, was_training = next(judge.parameters()).device, judge.training
    judge.eval()
    out = torch.cat([fn(_model_input(chunk.to(device))).cpu() for chunk in images.split(max(1, batch_size))])
    judge.train(was_training)
    return out


def _predict(judge: Judge, images: Tensor, batch_size: int) -> Tensor:
    return _apply(judge, images, lambda x: judge(x).argmax(1), batch_size)


def judge_features(judge: Judge, images: Tensor, batch_size: int = 256) -> Tensor:
    """uint8 (n, c, h, w) -> float64 features (n, 4 * width)."""
    check_images(images, "images", judge.config)
    return _apply(judge, images, judge.features, batch_size).double()


def judge_accuracy(judge: Judge, images: Tensor, labels: Tensor | None, batch_size: int = 256) -> float:
    """Share of correct predictions: of the labels, or (rotation task) of each image's rotation, 4 ways."""
    cfg = judge.config
    check_images(images, "images", cfg)
    if cfg.task == "rotation":
        sq = _square(images)
        turns = torch.arange(ROTATIONS).repeat_interleave(len(images))
        rotated = torch.cat([torch.rot90(sq, k, dims=(2, 3)) for k in range(ROTATIONS)])
        return float((_predict(judge, rotated, batch_size) == turns).double().mean())
    if labels is None:
        raise VQGenError("judge accuracy on the labels task needs the images' labels, got None")
    _check_labels(labels, len(images), cfg.num_classes, "labels")
    return float((_predict(judge, images, batch_size) == labels.cpu()).double().mean())


def judge_is_reliable(judge: Judge, test_images: Tensor, test_labels: Tensor | None) -> tuple[bool, float]:
    """(reliable, test accuracy): reliable when accuracy >= 2x chance (for 2 classes: halfway to 1)."""
    accuracy = judge_accuracy(judge, test_images, test_labels)
    chance = 1.0 / judge.config.outputs
    return accuracy >= min(2 * chance, (1 + chance) / 2), accuracy


@dataclass(frozen=True)
class Reference:
    """The real test images as every score needs them, computed once per evaluation: the mean and
    covariance of their judge features, and the judge's accuracy on them (None for a labels judge
    given no labels)."""
    mean: Tensor
    cov: Tensor
    judge_test_accuracy: float | None
    features: Tensor | None = None  # (n, f) float64, for KID and the k-NN measures (None: FID only)
    radii: dict[int, Tensor] | None = None  # k -> (n,) distance of each to its k-th nearest other


def reference_of(judge: Judge, images: Tensor, labels: Tensor | None, batch_size: int = 256) -> Reference:
    """The `Reference` of uint8 (n, c, h, w) test images (and their labels, if any)."""
    check_images(images, "reference images", judge.config)
    accuracy = None
    if judge.config.task == "rotation" or labels is not None:
        accuracy = judge_accuracy(judge, images, labels, batch_size)
    features = judge_features(judge, images, batch_size)
    radii = {k: sample_metrics.knn_radii(features, k) for k in (PR_K, DC_K) if k < len(features)}
    return Reference(*feature_stats(features), accuracy, features, radii)


def sample_quality(judge: Judge, samples: Tensor, sample_labels: Tensor | None, reference: Reference,
                   batch_size: int = 256) -> dict[str, float]:
    """fid (judge features of samples vs the reference's), class_accuracy and coverage (labels task),
    judge_test_accuracy; with the reference's features, `distribution_scores` too.

    Compare with `reference_floor` at the same number of samples: FID is biased by n.
    """
    cfg = judge.config
    check_images(samples, "samples", cfg)
    features = judge_features(judge, samples, batch_size)
    result = {"n_samples": float(len(samples)),
              "fid": frechet_distance(*feature_stats(features), reference.mean, reference.cov)}
    if reference.features is not None:
        result.update(distribution_scores(features, reference))
    if reference.judge_test_accuracy is not None:
        result["judge_test_accuracy"] = reference.judge_test_accuracy
        result["judge_chance"] = 1.0 / cfg.outputs
    if cfg.task == "labels":
        predicted = _predict(judge, samples, batch_size)
        if sample_labels is not None:
            _check_labels(sample_labels, len(samples), cfg.num_classes, "sample labels")
            result["class_accuracy"] = float((predicted == sample_labels.cpu()).double().mean())
        p = torch.bincount(predicted, minlength=cfg.num_classes).double() / len(predicted)
        p = p[p > 0]
        result["coverage"] = float((p * p.reciprocal().log()).sum() / math.log(cfg.num_classes))
    return result


def reference_floor(judge: Judge, train_images: Tensor, reference: Reference, n: int, seed: int = 0, *,
                    train_labels: Tensor | None = None,
                    transform: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
    """`sample_quality` of n random real training images (with train_labels, if given) against the reference.

    transform: applied to the n picked images first (say, the VQ-VAE's reconstruction of them: the
    best a prior's samples can score through that decoder)."""
    check_images(train_images, "training images", judge.config)
    if not 2 <= n <= len(train_images):
        raise VQGenError(f"reference floor: n must be in [2, {len(train_images)}] (the training images), got {n}")
    if train_labels is not None:
        _check_labels(train_labels, len(train_images), 0, "training labels")
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))[:n]
    labels = train_labels[pick.to(train_labels.device)] if train_labels is not None else None
    picked = train_images[pick.to(train_images.device)]
    if transform is not None:
        picked = transform(picked).to(train_images.device)
    return sample_quality(judge, picked, labels, reference)


# --- beyond the FID: KID, k-NN manifolds, memorisation (vqgen.core.evaluate.sample_metrics) -------------

PR_K, DC_K = 3, 5  # neighbours of precision/recall (Kynkäänniemi et al.) and density/coverage (Naeem et al.)


def distribution_scores(features: Tensor, reference: Reference) -> dict[str, float]:
    """kid and kid_std_error, precision and recall (k=3), density and coverage_nn (k=5; not the class
    `coverage`) of sample features (n, f) against the reference's; a k-NN measure needs n > k."""
    assert reference.features is not None and reference.radii is not None
    kid, kid_std_error = sample_metrics.kid(reference.features, features)
    result = {"kid": kid, "kid_std_error": kid_std_error}
    if PR_K in reference.radii and len(features) > PR_K:
        result.update(sample_metrics.precision_recall(reference.features, features, PR_K, reference.radii[PR_K]))
    if DC_K in reference.radii and len(features) > DC_K:
        dc = sample_metrics.density_coverage(reference.features, features, DC_K, reference.radii[DC_K])
        result.update(density=dc["density"], coverage_nn=dc["coverage"])
    return result


def memorisation_scores(judge: Judge, sample_sets: Sequence[Tensor], train_images: Tensor,
                        heldout_images: Tensor, seed: int = 0, batch_size: int = 256
                        ) -> list[tuple[dict[str, float], dict[str, sample_metrics.Memorisation]]]:
    """Near-copies of training images in each set of uint8 samples, in the judge's features and in pixels,
    by thresholds learnt once on held-out images (>= 4) -> per set (near_copies, near_copies_heldout,
    near_copy_threshold, the same with _pixels, and heldout_duplicates: the share of held-out images
    identical to a training image, left out of the calibration; {"features": ..., "pixels": Memorisation})."""
    for images, what in ((train_images, "training images"), (heldout_images, "held-out images"),
                         *((x, "samples") for x in sample_sets)):
        check_images(images, what, judge.config)
    device = next(judge.parameters()).device
    spaces = {"features": lambda x: judge_features(judge, x, batch_size).to(device),
              "pixels": lambda x: sample_metrics.pixels(x).to(device)}
    found = [{} for _ in sample_sets]
    for space, embed in spaces.items():
        train = embed(train_images)
        threshold = sample_metrics.copy_threshold(train, embed(heldout_images), seed=seed)
        for i, samples in enumerate(sample_sets):
            found[i][space] = sample_metrics.near_copies(embed(samples), train, threshold)
    return [({**f["features"].scores(), **f["pixels"].scores("_pixels"),
              "heldout_duplicates": f["pixels"].heldout_duplicates}, f) for f in found]
