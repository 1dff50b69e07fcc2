"""The user's `--data` choice as in-memory uint8 images, split into train and test.

Sources: the built-in shapes (default), a folder of images, parquet/arrow files, a
`save_to_disk` folder, or a Hugging Face hub name (`owner/name`). Every image is decoded
once into a uint8 tensor, so the dataset must fit in RAM as uint8 (MNIST: 55 MB).
Models see images in [-1, 1]: `to_model_range` and `to_uint8` convert. `datasets` is
imported only when a source needs it, so the built-in data starts at once.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from vqgen.errors import VQGenError
from vqgen.shapes import MIN_SIZE, make_shapes

BUILTIN = "builtin"
NO_LABELS = "none"  # label_column value that ignores the source's labels
RESIZE_MODES = ("resize", "center-crop", "pad")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
DATA_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}
TEST_SPLITS = ("test", "validation", "valid", "val")  # in order of preference
IMAGE_COLUMNS = ("image", "img", "images", "pixel_values", "pixels", "picture")
LABEL_COLUMNS = ("label", "labels", "class", "fine_label", "target", "category")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are brought to one size.

    `source`: "builtin", a folder of images (one subfolder per class, or flat), a parquet or
    arrow file or folder of them, a `save_to_disk` folder, or a hub name like "ylecun/mnist".
    Columns are found automatically when None; label_column="none" ignores labels.
    """

    source: str = BUILTIN
    image_column: str | None = None
    label_column: str | None = None
    image_size: int | None = None  # every image brought to image_size x image_size when set
    resize_mode: str = "resize"  # "resize" (stretch), "center-crop" or "pad" (zeros, never shrinks)
    test_fraction: float = 0.1  # held out, from seed, when the source has no test split
    seed: int = 0  # built-in images and the held-out test split
    builtin_train_size: int = 10000
    builtin_test_size: int = 2000
    max_images: int | None = None  # keep the first N of each split (quick runs)

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source.strip():
            raise VQGenError(f"data source must be a non-empty string, got {self.source!r}")
        for name in ("image_column", "label_column"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise VQGenError(f"{name} must be a column name or None, got {value!r}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 1):
            raise VQGenError(f"image_size must be a positive integer or None, got {self.image_size!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise VQGenError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise VQGenError(f"test_fraction must be between 0 and 1 (exclusive), got {self.test_fraction!r}")
        for name in ("builtin_train_size", "builtin_test_size"):
            if getattr(self, name) < 1:
                raise VQGenError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_images is not None and self.max_images < 1:
            raise VQGenError(f"max_images must be >= 1 or None, got {self.max_images!r}")


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


class ImageDataset(torch.utils.data.Dataset):
    """One split as model inputs: {"image": float32 (c, h, w) in [-1, 1], "label": int64, "index": int64}.

    "label" is -1 when the split is unlabelled.
    """

    def __init__(self, split: ImageSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        label = -1 if self.split.labels is None else int(self.split.labels[i])
        return {
            "image": to_model_range(self.split.images[i]),
            "label": torch.tensor(label, dtype=torch.int64),
            "index": torch.tensor(i, dtype=torch.int64),
        }

    def batch(self, indices: list[int]) -> dict[str, Tensor]:
        """A whole batch by one indexing op (`vqgen.trainer.make_loader` uses it instead of n items)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        labels = torch.full_like(idx, -1) if self.split.labels is None else self.split.labels[idx]
        return {"image": to_model_range(self.split.images[idx]), "label": labels, "index": idx}


# --- one split before decoding -------------------------------------------------------------


@dataclass
class _Raw:
    """A split as references: per image its bytes, a file path (str) or a pixel array."""

    refs: list[Any]
    labels: np.ndarray | None  # int64 (n,)
    origin: str  # where the split comes from, for messages
    rows: np.ndarray  # row numbers in the origin, for messages

    def take(self, idx: np.ndarray) -> _Raw:
        labels = None if self.labels is None else self.labels[idx]
        return _Raw([self.refs[i] for i in idx], labels, self.origin, self.rows[idx])

    def where(self, i: int) -> str:
        ref = self.refs[i]
        return ref if isinstance(ref, str) else f"row {self.rows[i]} of {self.origin}"


def _raw(refs: list[Any], labels: np.ndarray | None, origin: str) -> _Raw:
    return _Raw(refs, labels, origin, np.arange(len(refs)))


@dataclass
class _Source:
    train: _Raw
    test: _Raw | None  # None: hold out test_fraction of train
    class_names: list[str] | None
    description: str


def _pick_splits(names: list[str], origin: str) -> tuple[str, str | None]:
    """The train split's name and the preferred test split's name (None if there is none)."""
    lower = {n.lower(): n for n in names}
    if "train" in lower:
        train = lower["train"]
    elif len(names) == 1:
        train = names[0]
    else:
        raise VQGenError(f"{origin} has splits {sorted(names)} but no 'train' split")
    test = next((lower[t] for t in TEST_SPLITS if t in lower and lower[t] != train), None)
    return train, test


# --- image folders --------------------------------------------------------------------------


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _images_under(folder: Path) -> list[str]:
    """Every image file below `folder` in sorted walk order, hidden files and folders skipped."""
    found = []
    for top, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if _visible(d))
        found += [os.path.join(top, f) for f in sorted(files) if _visible(f) and _is_image(f)]
    return found


def _scan_split(folder: Path) -> tuple[list[str], list[str] | None]:
    """Image paths of one split folder and each one's class (its subfolder), or None when flat."""
    entries = sorted(p for p in folder.iterdir() if _visible(p.name))
    loose = [str(p) for p in entries if p.is_file() and _is_image(p.name)]
    classes = [(p.name, found) for p in entries if p.is_dir() and (found := _images_under(p))]
    if loose and classes:
        raise VQGenError(
            f"folder {folder} mixes loose images ({loose[0]}) with class subfolders ({classes[0][0]}/); "
            "put every image in a class subfolder, or none"
        )
    if not classes:
        return loose, None
    return [f for _, found in classes for f in found], [c for c, found in classes for _ in found]


def _folder_source(root: Path) -> _Source:
    """Class subfolders give labels; subfolders named train/test/validation/valid/val are splits."""
    subdirs = [p for p in sorted(root.iterdir()) if p.is_dir() and _visible(p.name)]
    if subdirs and all(p.name.lower() in ("train",) + TEST_SPLITS for p in subdirs):
        folders = {p.name: p for p in subdirs}
    else:
        folders = {"train": root}
    scans = {split: _scan_split(folder) for split, folder in folders.items()}  # split -> (files, classes)
    if not any(files for files, _ in scans.values()):
        raise VQGenError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in folder {root}")
    flat = [s for s, (_, classes) in scans.items() if classes is None]
    labelled = [s for s in scans if s not in flat]
    if flat and labelled:
        raise VQGenError(f"{folders[labelled[0]]} has class subfolders but {folders[flat[0]]} does not")
    names = sorted({c for _, classes in scans.values() for c in classes or ()}) or None
    index = {c: i for i, c in enumerate(names or ())}
    raws = {}
    for split, (files, classes) in scans.items():
        labels = None if classes is None else np.array([index[c] for c in classes], dtype=np.int64)
        raws[split] = _raw(files, labels, f"folder {folders[split]}")
    train, test = _pick_splits(list(raws), f"folder {root}")
    return _Source(raws[train], raws.get(test), names, f"image folder {root}")


# --- `datasets` sources ---------------------------------------------------------------------


def _datasets():
    """`datasets`, imported on first use (the built-in data never needs it) and told to log errors only."""
    import datasets

    datasets.logging.set_verbosity_error()  # e.g. "Repo card metadata block was not found" for local files
    return datasets


def _reason(err: BaseException) -> str:
    """A short, one-line reason from an exception."""
    if isinstance(err, UnidentifiedImageError):
        return "not a recognised image format"
    lines = str(err).strip().splitlines()
    return (lines[0][:200] if lines else "") or type(err).__name__


def _features(ds: Any) -> Any:
    """A dataset's features; streamed sources may only know them once a batch is read."""
    datasets = _datasets()

    if ds.features is not None:
        return ds.features
    first = next(iter(ds.with_format("arrow").iter(batch_size=1)), None)
    return datasets.Features.from_arrow_schema(first.schema) if first is not None else datasets.Features()


def _image_column(features: Mapping[str, Any], wanted: str | None, origin: str) -> str:
    datasets = _datasets()

    if wanted is not None:
        if wanted not in features:
            raise VQGenError(f"image column {wanted!r} not in {origin}; its columns are {list(features)}")
        return wanted
    found = [n for n, f in features.items() if isinstance(f, datasets.Image)]
    found += [n for n in IMAGE_COLUMNS if n in features]
    if not found:
        raise VQGenError(f"no image column in {origin}: its columns are {list(features)}; name one with image_column")
    return found[0]


def _label_column(features: Mapping[str, Any], wanted: str | None, origin: str) -> str | None:
    datasets = _datasets()

    if wanted is not None:
        if wanted.lower() == NO_LABELS:
            return None
        if wanted not in features:
            raise VQGenError(f"label column {wanted!r} not in {origin}; its columns are {list(features)}")
        return wanted
    found = [n for n, f in features.items() if isinstance(f, datasets.ClassLabel)]
    found += [n for n in LABEL_COLUMNS if n in features]
    return found[0] if found else None


def _read_columns(ds: Any, columns: list[str], limit: int | None, origin: str) -> pa.Table:
    """The given columns of a Dataset or IterableDataset as one arrow table (first `limit` rows)."""
    try:
        if limit is not None:
            ds = ds.take(limit)
        tables = list(ds.select_columns(columns).with_format("arrow").iter(batch_size=10_000))
    except (OSError, ValueError) as err:
        raise VQGenError(f"could not read {origin}: {_reason(err)}") from None
    if not tables or sum(len(t) for t in tables) == 0:
        raise VQGenError(f"{origin} is empty")
    return pa.concat_tables(tables)


def _image_refs(column: pa.ChunkedArray, name: str, origin: str) -> list[Any]:
    """Per row: encoded bytes, a file path, or a pixel array."""
    kind = column.type
    if pa.types.is_struct(kind):  # datasets.Image storage: {"bytes", "path"}
        fields = dict(zip([f.name for f in kind], column.flatten()))
        data = fields["bytes"].to_pylist() if "bytes" in fields else [None] * len(column)
        paths = fields["path"].to_pylist() if "path" in fields else [None] * len(column)
        return [b if b is not None else p for b, p in zip(data, paths)]
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_string(kind):
        return column.to_pylist()
    if isinstance(kind, (pa.ListType, pa.LargeListType, pa.FixedSizeListType, pa.ExtensionType)):
        return [None if row is None else np.asarray(row) for row in column.to_pylist()]
    raise VQGenError(f"column {name!r} of {origin} holds {kind}, expected images (Image feature, bytes, paths, arrays)")


def _encode_labels(
    columns: dict[str, pa.ChunkedArray], feature: Any, name: str, origin: str
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Each split's label column -> int64 class indices, and the class names they index."""
    datasets = _datasets()

    what = f"label column {name!r} of {origin}"
    ignore = "set label_column='none' to ignore labels"
    if any(c.null_count for c in columns.values()):
        raise VQGenError(f"{what} has missing values; {ignore}")
    if all(pa.types.is_string(c.type) or pa.types.is_large_string(c.type) for c in columns.values()):
        names = sorted({v for c in columns.values() for v in c.to_pylist()})
        index = {v: i for i, v in enumerate(names)}
        return {s: np.array([index[v] for v in c.to_pylist()], dtype=np.int64) for s, c in columns.items()}, names
    kind = next((c.type for c in columns.values() if not pa.types.is_integer(c.type)), None)
    if kind is not None:
        raise VQGenError(f"{what} holds {kind} values, expected class indices or names; {ignore}")
    values = {s: c.to_numpy().astype(np.int64) for s, c in columns.items()}
    low, high = min(int(v.min()) for v in values.values()), max(int(v.max()) for v in values.values())
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else [str(i) for i in range(high + 1)]
    if low < 0 or high >= len(names):
        bad = low if low < 0 else high
        raise VQGenError(f"{what} holds {bad}, expected class indices 0..{len(names) - 1}; {ignore}")
    return values, names


def _datasets_source(loaded: Any, origin: str, cfg: DataConfig) -> _Source:
    """A Dataset, IterableDataset or a dict of them (splits) -> train and test references."""
    splits = dict(loaded) if isinstance(loaded, Mapping) else {"train": loaded}
    train, test = _pick_splits(list(splits), origin)
    features = _features(splits[train])
    image_col = _image_column(features, cfg.image_column, f"split {train!r} of {origin}")
    label_col = _label_column(features, cfg.label_column, f"split {train!r} of {origin}")
    columns = [image_col] + ([label_col] if label_col else [])
    names = [train] + ([test] if test else [])
    tables = {}
    for split in names:
        have = list(_features(splits[split]))
        missing = [c for c in columns if c not in have]
        if missing:
            raise VQGenError(f"split {split!r} of {origin} has no column {missing[0]!r}; its columns are {have}")
        limit = cfg.max_images if test else None  # with a held-out split, every row is needed first
        tables[split] = _read_columns(splits[split], columns, limit, f"split {split!r} of {origin}")
    labels, class_names = {s: None for s in names}, None
    if label_col:
        label_columns = {s: t.column(label_col) for s, t in tables.items()}
        labels, class_names = _encode_labels(label_columns, features[label_col], label_col, origin)
    raws = {
        s: _raw(_image_refs(t.column(image_col), image_col, origin), labels[s], f"split {s!r} of {origin}")
        for s, t in tables.items()
    }
    return _Source(raws[train], raws.get(test), class_names, origin)


def _has_data_files(folder: Path) -> bool:
    for _, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if _visible(d)]
        if any(os.path.splitext(f)[1].lower() in DATA_SUFFIXES for f in files):
            return True
    return False


def _local_source(path: Path, cfg: DataConfig) -> _Source:
    """A save_to_disk folder, parquet/arrow file(s) or, failing those, a folder of images."""
    datasets = _datasets()

    saved = path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())
    if path.is_dir() and not saved and not _has_data_files(path):
        _check_no_columns(cfg, f"image folder {path}")
        return _folder_source(path)
    if path.is_file() and path.suffix.lower() not in DATA_SUFFIXES:
        raise VQGenError(f"data file {path} is not .parquet or .arrow; pass a folder of images or of data files")
    try:  # streaming reads local files in place instead of copying them into the datasets cache
        if saved:
            loaded, origin = datasets.load_from_disk(str(path)), f"saved dataset {path}"
        elif path.is_file():
            builder = DATA_SUFFIXES[path.suffix.lower()]
            loaded, origin = datasets.load_dataset(builder, data_files=str(path), streaming=True), f"file {path}"
        else:
            loaded, origin = datasets.load_dataset(str(path), streaming=True), f"data files in {path}"
    except Exception as err:  # datasets raises many types for a folder it cannot read
        raise VQGenError(f"could not read {path} with datasets: {_reason(err)}") from None
    return _datasets_source(loaded, origin, cfg)


def _is_hub_name(source: str) -> bool:
    """owner/name, not a path: one slash, no file suffix, and no local folder called `owner`."""
    if not _HUB_NAME.fullmatch(source):
        return False
    owner, name = source.split("/")
    suffix = os.path.splitext(name)[1].lower()
    return not Path(owner).exists() and suffix not in DATA_SUFFIXES and suffix not in IMAGE_SUFFIXES


def _hub_source(name: str, cfg: DataConfig) -> _Source:
    """Download through `datasets`; without a network, fail in a second, not after 25 s of retries."""
    datasets = _datasets()
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    if not datasets.config.HF_HUB_OFFLINE:  # offline mode skips the probe and reads the cache
        try:
            HfApi().dataset_info(name, timeout=10)
        except RepositoryNotFoundError:
            raise VQGenError(f"data source {name!r} not found: no such local path nor public hub dataset") from None
        except Exception as err:  # connection errors come from several libraries
            raise VQGenError(
                f"could not load {name!r} from the Hugging Face hub (no network?): {_reason(err)}"
            ) from None
    try:
        loaded = datasets.load_dataset(name)
    except Exception as err:  # offline mode without a cached copy raises ConnectionError
        hint = " (no network?)" if isinstance(err, (ConnectionError, TimeoutError)) else ""
        raise VQGenError(f"could not load {name!r} from the Hugging Face hub{hint}: {_reason(err)}") from None
    return _datasets_source(loaded, f"hub dataset {name}", cfg)


# --- decoding -------------------------------------------------------------------------------


def _array_image(a: np.ndarray) -> Image.Image:
    """(h, w) or (h, w, c) integers in 0..255 -> a PIL image."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError(f"pixel array of shape {a.shape}, expected (h, w) or (h, w, 1|3|4)")
    if a.dtype != np.uint8 and (a.dtype.kind not in "iu" or a.min() < 0 or a.max() > 255):
        raise ValueError(f"pixel array of {a.dtype} values, expected integers 0..255")
    return Image.fromarray(a.astype(np.uint8))


def _open(ref: Any) -> Image.Image:
    if isinstance(ref, np.ndarray):
        return _array_image(ref)
    if ref is None:
        raise ValueError("no image data")
    data = Path(ref).read_bytes() if isinstance(ref, str) else ref  # bytes: no file handle left open
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _normalise(img: Image.Image) -> Image.Image:
    """Any mode -> "L" (grey) or "RGB"; transparency is composited onto black."""
    if img.mode in ("L", "RGB"):
        return img
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    if img.mode == "1":
        return img.convert("L")
    if img.mode.startswith("I;16"):  # 16-bit grey
        return Image.fromarray((np.asarray(img) >> 8).astype(np.uint8))
    if img.mode in ("I", "F"):
        return Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8))
    if img.mode in ("LA", "RGBA"):
        colour = img.convert(img.mode[:-1])
        canvas = Image.new(colour.mode, img.size, 0)
        canvas.paste(colour, mask=img.getchannel("A"))
        return canvas
    return img.convert("RGB")  # RGB, CMYK, YCbCr, LAB, HSV, ...


def _fit(img: Image.Image, size: int | None, mode: str) -> Image.Image:
    """Bring an image to size x size: stretch, resize the shorter side and crop, or pad with zeros."""
    if size is None or img.size == (size, size):
        return img
    if mode == "resize":
        return img.resize((size, size), Image.Resampling.BICUBIC)  # antialiased when shrinking
    if mode == "center-crop":
        return ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)
    canvas = Image.new(img.mode, (size, size), 0)
    canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return canvas


def _pixels(raw: _Raw, i: int, cfg: DataConfig) -> np.ndarray:
    """Image i of a split, decoded, as uint8 (h, w, c) with c in {1, 3}."""
    try:
        img = _normalise(_open(raw.refs[i]))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise VQGenError(f"cannot read image {raw.where(i)}: {_reason(err)}") from None
    size = cfg.image_size
    if size is not None and cfg.resize_mode == "pad" and (img.width > size or img.height > size):
        raise VQGenError(
            f"image {raw.where(i)} is {img.width}x{img.height}, larger than image_size={size}; "
            "resize_mode='pad' only pads"
        )
    px = np.asarray(_fit(img, size, cfg.resize_mode))
    return px[:, :, None] if px.ndim == 2 else px


def _size_error(a: tuple[str, tuple[int, ...]], b: tuple[str, tuple[int, ...]]) -> VQGenError:
    (where_a, (ha, wa)), (where_b, (hb, wb)) = a, b
    return VQGenError(
        f"images differ in size: {wa}x{ha} ({where_a}) and {wb}x{hb} ({where_b}); set image_size to unify them"
    )


def _decode(raw: _Raw, cfg: DataConfig) -> np.ndarray:
    """Decode every image of a split -> uint8 (n, c, h, w); grey becomes RGB once a colour image appears."""
    out = None
    for i in range(len(raw.refs)):
        px = _pixels(raw, i, cfg)  # (h, w, c)
        if out is None:
            out = np.empty((len(raw.refs), px.shape[2], px.shape[0], px.shape[1]), dtype=np.uint8)
        elif px.shape[:2] != out.shape[2:]:
            raise _size_error((raw.where(0), out.shape[2:]), (raw.where(i), px.shape[:2]))
        if px.shape[2] > out.shape[1]:
            out = np.repeat(out, px.shape[2], axis=1)  # (n, 3, h, w)
        out[i] = px.transpose(2, 0, 1)  # grey broadcasts into RGB
    return out


def _hold_out(raw: _Raw, fraction: float, seed: int) -> tuple[_Raw, _Raw]:
    """Split off a fixed random `fraction` (at least one image) as the test split."""
    n = len(raw.refs)
    if n < 2:
        raise VQGenError(f"{raw.origin} has {n} image; at least 2 are needed to hold out a test split")
    n_test = min(n - 1, max(1, round(n * fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return raw.take(np.sort(perm[n_test:])), raw.take(np.sort(perm[:n_test]))


def _ignores_labels(cfg: DataConfig) -> bool:
    return cfg.label_column is not None and cfg.label_column.lower() == NO_LABELS


def _check_no_columns(cfg: DataConfig, what: str) -> None:
    """Column options only mean something for `datasets` sources; refusing beats ignoring them."""
    for field in ("image_column", "label_column"):
        value = getattr(cfg, field)
        if value is not None and not (field == "label_column" and _ignores_labels(cfg)):
            raise VQGenError(f"{field}={value!r} applies to parquet, arrow, saved or hub data, not to {what}")


def _builtin(cfg: DataConfig) -> ImageData:
    """Shapes drawn at image_size (default 32); train and test come from disjoint seeds."""
    _check_no_columns(cfg, "the built-in shapes")
    size = cfg.image_size or 32
    if size < MIN_SIZE:
        raise VQGenError(f"image_size={size} is too small for the built-in shapes, expected >= {MIN_SIZE}")
    n_train, n_test = cfg.builtin_train_size, cfg.builtin_test_size
    if cfg.max_images is not None:
        n_train, n_test = min(n_train, cfg.max_images), min(n_test, cfg.max_images)
    x_train, y_train, names = make_shapes(n_train, seed=2 * cfg.seed, size=size)
    x_test, y_test, _ = make_shapes(n_test, seed=2 * cfg.seed + 1, size=size)
    if _ignores_labels(cfg):
        y_train = y_test = names = None
    description = f"built-in shapes {size}x{size} (seed {cfg.seed})"
    return ImageData(ImageSplit(x_train, y_train), ImageSplit(x_test, y_test), names, description)


def _source(cfg: DataConfig) -> _Source:
    path = Path(cfg.source).expanduser()
    if path.exists():
        return _local_source(path, cfg)
    if _is_hub_name(cfg.source):
        return _hub_source(cfg.source, cfg)
    raise VQGenError(f"data source not found: {cfg.source!r} is no file or folder, nor a hub name (owner/name)")


def load_image_data(cfg: DataConfig) -> ImageData:
    """Decode the chosen source into uint8 train and test splits with optional labels."""
    if cfg.source == BUILTIN:
        return _builtin(cfg)
    src = _source(cfg)
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
    x_train, x_test = _decode(train, cfg), _decode(test, cfg)
    if x_train.shape[2:] != x_test.shape[2:]:
        raise _size_error((train.where(0), x_train.shape[2:]), (test.where(0), x_test.shape[2:]))
    if x_train.shape[1] != x_test.shape[1]:  # one split grey, the other colour: both colour
        x_train, x_test = (np.repeat(x, 3 // x.shape[1], axis=1) for x in (x_train, x_test))

    class_names = None if _ignores_labels(cfg) else src.class_names  # a folder's classes, for one

    def split(x: np.ndarray, raw: _Raw) -> ImageSplit:
        labels = None if raw.labels is None or class_names is None else torch.from_numpy(raw.labels)
        return ImageSplit(torch.from_numpy(x), labels)

    return ImageData(split(x_train, train), split(x_test, test), class_names, description)
