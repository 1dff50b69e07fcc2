"""The user's `--data` choice as in-memory uint8 images, split into train and test.

Sources (`sources`): the built-in shapes (default), a folder of images, parquet/arrow files, a
`save_to_disk` folder, or a Hugging Face hub name (`owner/name`). Every image is decoded once
(`decode`) into a uint8 tensor, so the dataset must fit in RAM as uint8 (MNIST: 55 MB).
Models see images in [-1, 1]: `to_model_range` and `to_uint8` convert.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from vqgen.core.data.config import BUILTIN, DataConfig
from vqgen.core.data.decode import decode_split, size_error
from vqgen.core.data.shapes import MIN_SIZE, make_shapes
from vqgen.core.data.sources import RawSplit, find_source
from vqgen.core.errors import VQGenError
from vqgen.core.batches import BatchDataset


@dataclass
class ImageSplit:
    """One split, decoded."""

    images: Tensor  # uint8 (n, c, h, w)
    labels: Tensor | None  # int64 (n,), None when unlabelled

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class ImageData:
    """Train and test splits of one source; every image has the same (c, h, w)."""

    train: ImageSplit
    test: ImageSplit
    class_names: list[str] | None  # None when unlabelled
    source: str  # human-readable description

    @property
    def channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def height(self) -> int:
        return self.train.images.shape[2]

    @property
    def width(self) -> int:
        return self.train.images.shape[3]

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else 0


def to_model_range(x: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [-1, 1], any shape."""
    return x.float() / 127.5 - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """float [-1, 1] -> uint8 [0, 255], clamped and rounded; inverts `to_model_range`."""
    return ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


class ImageDataset(BatchDataset):
    """One split as model inputs: {"image": float32 (c, h, w) in [-1, 1], "label": int64, "index": int64}.

    "label" is -1 when the split is unlabelled.
    """

    def __init__(self, split: ImageSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def batch(self, indices: list[int]) -> dict[str, Tensor]:
        """A whole batch by one indexing op."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        labels = torch.full_like(idx, -1) if self.split.labels is None else self.split.labels[idx]
        return {"image": to_model_range(self.split.images[idx]), "label": labels, "index": idx}


def _hold_out(raw: RawSplit, fraction: float, seed: int) -> tuple[RawSplit, RawSplit]:
    """Split off a fixed random `fraction` (at least one image) as the test split."""
    n = len(raw.refs)
    if n < 2:
        raise VQGenError(f"{raw.origin} has {n} image; at least 2 are needed to hold out a test split")
    n_test = min(n - 1, max(1, round(n * fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return raw.take(np.sort(perm[n_test:])), raw.take(np.sort(perm[:n_test]))


def _builtin(cfg: DataConfig) -> ImageData:
    """Shapes drawn at image_size (default 32); train and test come from disjoint seeds."""
    cfg.check_no_columns("the built-in shapes")
    size = cfg.image_size or 32
    if size < MIN_SIZE:
        raise VQGenError(f"image_size={size} is too small for the built-in shapes, expected >= {MIN_SIZE}")
    n_train, n_test = cfg.builtin_train_size, cfg.builtin_test_size
    if cfg.max_images is not None:
        n_train, n_test = min(n_train, cfg.max_images), min(n_test, cfg.max_images)
    x_train, y_train, names = make_shapes(n_train, seed=2 * cfg.seed, size=size)
    x_test, y_test, _ = make_shapes(n_test, seed=2 * cfg.seed + 1, size=size)
    if cfg.ignores_labels:
        y_train = y_test = names = None
    description = f"built-in shapes {size}x{size} (seed {cfg.seed})"
    return ImageData(ImageSplit(x_train, y_train), ImageSplit(x_test, y_test), names, description)




def load_image_data(cfg: DataConfig) -> ImageData:
    """Decode the chosen source into uint8 train and test splits with optional labels."""
    if cfg.source == BUILTIN:
        return _builtin(cfg)
    src = find_source(cfg)
    train, test, description = src.train, src.test, src.description
    if not train.refs:
        raise VQGenError(f"{train.origin} has no images")
    if test is None:
        train, test = _hold_out(train, cfg.test_fraction, cfg.seed)
        description += f" (test: {cfg.test_fraction:g} of train held out, seed {cfg.seed})"
    if cfg.max_images is not None:
        train, test = (r.take(np.arange(min(len(r.refs), cfg.max_images))) for r in (train, test))
    if not test.refs:
        raise VQGenError(f"{test.origin} has no images")
    x_train, x_test = decode_split(train, cfg), decode_split(test, cfg)
    if x_train.shape[2:] != x_test.shape[2:]:
        raise size_error((train.where(0), x_train.shape[2:]), (test.where(0), x_test.shape[2:]))
    if x_train.shape[1] != x_test.shape[1]:  # one split grey, the other colour: both colour
        x_train, x_test = (np.repeat(x, 3 // x.shape[1], axis=1) for x in (x_train, x_test))

    class_names = None if cfg.ignores_labels else src.class_names  # a folder's classes, for one

    def split(x: np.ndarray, raw: RawSplit) -> ImageSplit:
        labels = None if raw.labels is None or class_names is None else torch.from_numpy(raw.labels)
        return ImageSplit(torch.from_numpy(x), labels)

    return ImageData(split(x_train, train), split(x_test, test), class_names, description)
