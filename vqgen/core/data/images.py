"""The user's `--data` choice as uint8 images, split into train and test, in memory or streamed.

Sources (`sources`): the built-in shapes (default), a folder of images, parquet/arrow files, a
`save_to_disk` folder, or a Hugging Face hub name (`owner/name`). A split whose images fit (`--stream
auto`: at most 1 GiB decoded) is decoded once into a uint8 tensor; a larger one is streamed: its
images stay encoded in memory-mapped Arrow files (`arrow`) and are decoded per batch, in the
DataLoader's workers. Both answer `take(indices)`; models see images in [-1, 1] (`to_model_range`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vqgen.core.data.arrow import ArrowRefs, cached_table, file_stamps, fingerprint
from vqgen.core.data.config import BUILTIN, STREAM_ABOVE, DataConfig
from vqgen.core.data.decode import decode_one, decode_split, pixels, size_error
from vqgen.core.data.loaders import BatchDataset
from vqgen.core.data.shapes import MIN_SIZE, make_shapes
from vqgen.core.data.sources import RawSplit, find_source
from vqgen.core.runtime.errors import VQGenError


@dataclass
class ImageSplit:
    """One split, decoded into memory. `StreamedSplit` answers the same calls from disk."""

    images: Tensor  # uint8 (n, c, h, w)
    labels: Tensor | None  # int64 (n,), None when unlabelled
    streamed = False

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(c, h, w) of every image."""
        return tuple(self.images.shape[1:])

    def take(self, indices: Tensor | np.ndarray | list[int]) -> Tensor:
        """The images at `indices` -> uint8 (k, c, h, w); only these are read (and decoded, if streamed)."""
        return self.images[torch.as_tensor(np.asarray(indices), dtype=torch.int64)]


class StreamedSplit(ImageSplit):
    """One split whose images stay encoded on disk (memory-mapped Arrow) and are decoded on `take`."""

    streamed = True

    def __init__(self, raw: RawSplit, cfg: DataConfig, shape: tuple[int, int, int], labels: Tensor | None):
        self.raw, self.cfg, self._shape, self.labels = raw, cfg, shape, labels

    def __len__(self) -> int:
        return len(self.raw.refs)

    def __repr__(self) -> str:
        return f"StreamedSplit({len(self)} images {'x'.join(map(str, self._shape))} from {self.raw.origin})"

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._shape

    @property
    def images(self) -> Tensor:
        """Every image, decoded: as much memory as an in-memory split; prefer `take`."""
        return self.take(np.arange(len(self)))

    def take(self, indices: Tensor | np.ndarray | list[int]) -> Tensor:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), *self._shape), dtype=np.uint8)
        for k, i in enumerate(idx):
            out[k] = decode_one(self.raw, int(i), self.cfg, self._shape)
        return torch.from_numpy(out)


@dataclass
class ImageData:
    """Train and test splits of one source; every image has the same (c, h, w)."""

    train: ImageSplit
    test: ImageSplit
    class_names: list[str] | None  # None when unlabelled
    source: str  # human-readable description
    storage: str = "in memory"  # in memory or streamed, and why: for the log line that describes the data

    @property
    def channels(self) -> int:
        return self.train.shape[0]

    @property
    def height(self) -> int:
        return self.train.shape[1]

    @property
    def width(self) -> int:
        return self.train.shape[2]

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
        self.streamed = split.streamed  # the loader gives a streamed split workers by default

    def __len__(self) -> int:
        return len(self.split)

    def batch(self, indices: list[int]) -> dict[str, Tensor]:
        """A whole batch: one indexing op in memory; decoded image by image when streamed."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        labels = torch.full_like(idx, -1) if self.split.labels is None else self.split.labels[idx]
        return {"image": to_model_range(self.split.take(idx)), "label": labels, "index": idx}


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
    storage = f"in memory ({_gib(x_train.numel() + x_test.numel())}, generated)"
    return ImageData(ImageSplit(x_train, y_train), ImageSplit(x_test, y_test), names, description, storage)




def _gib(n: int) -> str:
    if n >= 1 << 28:
        return f"{n / (1 << 30):.2f} GiB"
    return f"{n / (1 << 20):.0f} MiB" if n >= 1 << 20 else f"{n / 1024:.0f} KiB"


def _on_disk(raw: RawSplit, console) -> RawSplit:
    """A folder split (file paths) as references into its Arrow copy, converted once into the cache."""
    if isinstance(raw.refs, ArrowRefs):
        return raw
    paths = list(raw.refs)
    if not all(isinstance(p, str) for p in paths):  # bytes read into memory: nothing to stream from
        raise VQGenError(f"{raw.origin} cannot be streamed; use stream='never'")
    import pyarrow as pa

    def batches():
        for at in range(0, len(paths), 256):
            chunk = [Path(p).read_bytes() for p in paths[at:at + 256]]
            yield pa.record_batch([pa.array(chunk, pa.binary())], names=["image"])

    table = cached_table(fingerprint("folder", file_stamps(paths)), batches(), len(paths), raw.origin, console)
    return RawSplit(ArrowRefs([str(table)], "image"), raw.labels, raw.origin, raw.rows)


def _first_shape(raws: list[RawSplit], cfg: DataConfig) -> tuple[int, int, int]:
    """(c, h, w) of a streamed dataset, from the first image of each split: colour if either is."""
    shapes = [pixels(r, 0, cfg).shape for r in raws]  # (h, w, c)
    if shapes[0][:2] != shapes[1][:2]:
        raise size_error((raws[0].where(0), shapes[0][:2]), (raws[1].where(0), shapes[1][:2]))
    return max(s[2] for s in shapes), shapes[0][0], shapes[0][1]


def load_image_data(cfg: DataConfig, console=None) -> ImageData:
    """The chosen source as uint8 train and test splits with optional labels: decoded into memory, or
    streamed (`cfg.stream`; auto: when n*c*h*w is over 1 GiB). `console` shows a conversion's progress."""
    from vqgen.core.runtime.console import make_console

    if cfg.source == BUILTIN:
        return _builtin(cfg)
    console = console or make_console()
    src = find_source(cfg, console)
    train, test, description = src.train, src.test, src.description
    if not train.refs:
        raise VQGenError(f"{train.origin} has no images")
    if test is None:
        train, test = _hold_out(train, cfg.test_fraction, cfg.seed)
        description += f" (test: {cfg.test_fraction:g} of train held out, seed {cfg.seed})"
    if cfg.max_images is not None:
        train, test = (r.take(np.arange(min(len(r.refs), cfg.max_images))) for r in (train, test))
    if not len(test.refs):
        raise VQGenError(f"{test.origin} has no images")
    class_names = None if cfg.ignores_labels else src.class_names  # a folder's classes, for one

    def labels_of(raw: RawSplit) -> Tensor | None:
        return None if raw.labels is None or class_names is None else torch.from_numpy(raw.labels)

    shape = None if cfg.stream == "never" else _first_shape([train, test], cfg)
    decoded = 0 if shape is None else (len(train.refs) + len(test.refs)) * int(np.prod(shape))
    stream = cfg.stream == "always" or (cfg.stream == "auto" and decoded > STREAM_ABOVE)
    why = {"always": "stream='always'", "never": "stream='never'"}.get(
        cfg.stream, f"{'over' if stream else 'within'} the {_gib(STREAM_ABOVE)} of stream='auto'")
    if stream:
        if cfg.code_copies:
            raise VQGenError(f"code_copies={cfg.code_copies} needs the images in memory, but {description} is "
                             f"streamed ({_gib(decoded)} decoded); set stream='never' or code_copies=0")
        train, test = _on_disk(train, console), _on_disk(test, console)
        splits = [StreamedSplit(r, cfg, shape, labels_of(r)) for r in (train, test)]
        storage = f"streamed from memory-mapped Arrow files, decoded per batch ({_gib(decoded)} decoded, {why})"
        return ImageData(splits[0], splits[1], class_names, description, storage)
    x_train, x_test = decode_split(train, cfg), decode_split(test, cfg)
    if x_train.shape[2:] != x_test.shape[2:]:
        raise size_error((train.where(0), x_train.shape[2:]), (test.where(0), x_test.shape[2:]))
    if x_train.shape[1] != x_test.shape[1]:  # one split grey, the other colour: both colour
        x_train, x_test = (np.repeat(x, 3 // x.shape[1], axis=1) for x in (x_train, x_test))

    storage = f"in memory ({_gib(x_train.nbytes + x_test.nbytes)} decoded, {why})"
    return ImageData(ImageSplit(torch.from_numpy(x_train), labels_of(train)),
                     ImageSplit(torch.from_numpy(x_test), labels_of(test)), class_names, description, storage)
