"""Where the images come from: a folder, parquet/arrow files, a `save_to_disk` folder or a hub name.

A source is found, its splits chosen and its labels encoded here; nothing is decoded yet: each
split is a `RawSplit` of references (bytes, file paths or pixel arrays) that `decode` turns into
pixels. `datasets` is imported only when a source needs it. Unless `stream` is "never", the image
column of a `datasets` source stays on disk: a saved or hub dataset's own memory-mapped Arrow files, or
a copy of parquet/arrow files converted once into the cache (`arrow`); its references are `ArrowRefs`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from vqgen.core.data.arrow import ArrowRefs, cached_table, file_stamps, fingerprint, map_table
from vqgen.core.data.config import NO_LABELS, DataConfig
from vqgen.core.runtime.errors import VQGenError, one_line

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
DATA_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}
TEST_SPLITS = ("test", "validation", "valid", "val")  # in order of preference
IMAGE_COLUMNS = ("image", "img", "images", "pixel_values", "pixels", "picture")
LABEL_COLUMNS = ("label", "labels", "class", "fine_label", "target", "category")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class RawSplit:
    """A split as references: per image its bytes, a file path (str) or a pixel array."""

    refs: list[Any] | ArrowRefs
    labels: np.ndarray | None  # int64 (n,)
    origin: str  # where the split comes from, for messages
    rows: np.ndarray  # row numbers in the origin, for messages

    @classmethod
    def of(cls, refs: list[Any], labels: np.ndarray | None, origin: str) -> RawSplit:
        """A whole split, its rows numbered from 0."""
        return cls(refs, labels, origin, np.arange(len(refs)))

    def take(self, idx: np.ndarray) -> RawSplit:
        labels = None if self.labels is None else self.labels[idx]
        refs = self.refs.take(idx) if isinstance(self.refs, ArrowRefs) else [self.refs[i] for i in idx]
        return RawSplit(refs, labels, self.origin, self.rows[idx])

    def where(self, i: int) -> str:
        ref = self.refs[i]
        return ref if isinstance(ref, str) else f"row {self.rows[i]} of {self.origin}"


@dataclass
class Source:
    """A source's splits before decoding."""

    train: RawSplit
    test: RawSplit | None  # None: hold out test_fraction of train
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


def _folder_source(root: Path) -> Source:
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
        raws[split] = RawSplit.of(files, labels, f"folder {folders[split]}")
    train, test = _pick_splits(list(raws), f"folder {root}")
    return Source(raws[train], raws.get(test), names, f"image folder {root}")


# --- `datasets` sources ---------------------------------------------------------------------


def _datasets():
    """`datasets`, imported on first use (the built-in data never needs it), and the Hub client it reads cards
    with, told to log errors only."""
    import datasets
    import huggingface_hub

    datasets.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()  # "Repo card metadata block was not found" for a local README
    return datasets


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
        raise VQGenError(f"could not read {origin}: {one_line(err)}") from None
    if not tables or sum(len(t) for t in tables) == 0:
        raise VQGenError(f"{origin} is empty")
    return pa.concat_tables(tables)


def _mapped_columns(ds: Any, columns: list[str], limit: int | None, origin: str, stamp: Any,
                    console: Any) -> tuple[pa.Table, list[str]]:
    """The given columns as a memory-mapped table and the Arrow files it lives in: a saved or hub
    dataset's own files, else a copy converted once into the cache (keyed by `stamp`, the columns and
    `limit`)."""
    datasets = _datasets()

    files = [f["filename"] for f in getattr(ds, "cache_files", None) or []]
    if isinstance(ds, datasets.Dataset) and files and ds._indices is None and limit is None:
        table = pa.concat_tables([map_table(f) for f in files])
        if len(table) == len(ds) and all(c in table.column_names for c in columns):
            return table.select(columns), files
    if stamp is None:  # a hub dataset with an index mapping, say: no stable key to cache it under
        return _read_columns(ds, columns, limit, origin), []
    try:
        if limit is not None:
            ds = ds.take(limit)
        batches = (b for t in ds.select_columns(columns).with_format("arrow").iter(batch_size=1000)
                   for b in t.to_batches())
        rows = len(ds) if isinstance(ds, datasets.Dataset) else None
        path = cached_table(fingerprint("datasets", stamp, columns, limit), batches, rows, origin, console)
    except (OSError, ValueError) as err:
        raise VQGenError(f"could not read {origin}: {one_line(err)}") from None
    table = map_table(path)
    if len(table) == 0:
        raise VQGenError(f"{origin} is empty")
    return table, [str(path)]


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


def _datasets_source(loaded: Any, origin: str, cfg: DataConfig, stamp: Any = None, console: Any = None) -> Source:
    """A Dataset, IterableDataset or a dict of them (splits) -> train and test references.

    Unless cfg.stream is "never", the references are `ArrowRefs` into memory-mapped files (`stamp`: what
    identifies the source's files, for the cache key)."""
    splits = dict(loaded) if isinstance(loaded, Mapping) else {"train": loaded}
    train, test = _pick_splits(list(splits), origin)
    features = _features(splits[train])
    image_col = _image_column(features, cfg.image_column, f"split {train!r} of {origin}")
    label_col = _label_column(features, cfg.label_column, f"split {train!r} of {origin}")
    columns = [image_col] + ([label_col] if label_col else [])
    names = [train] + ([test] if test else [])
    tables, files = {}, {}
    on_disk = cfg.stream != "never"
    for split in names:
        have = list(_features(splits[split]))
        missing = [c for c in columns if c not in have]
        if missing:
            raise VQGenError(f"split {split!r} of {origin} has no column {missing[0]!r}; its columns are {have}")
        limit = cfg.max_images if test else None  # with a held-out split, every row is needed first
        where = f"split {split!r} of {origin}"
        if on_disk:
            tables[split], files[split] = _mapped_columns(splits[split], columns, limit, where,
                                                          None if stamp is None else (stamp, split), console)
        else:
            tables[split] = _read_columns(splits[split], columns, limit, where)
    labels, class_names = {s: None for s in names}, None
    if label_col:
        label_columns = {s: t.column(label_col) for s, t in tables.items()}
        labels, class_names = _encode_labels(label_columns, features[label_col], label_col, origin)

    def refs(split: str, table: pa.Table) -> list[Any] | ArrowRefs:
        _image_refs(table.column(image_col).slice(0, 1), image_col, origin)  # refuses a column of non-images
        return ArrowRefs(files[split], image_col) if files.get(split) else _image_refs(
            table.column(image_col), image_col, origin)

    raws = {s: RawSplit.of(refs(s, t), labels[s], f"split {s!r} of {origin}") for s, t in tables.items()}
    return Source(raws[train], raws.get(test), class_names, origin)


def _has_data_files(folder: Path) -> bool:
    for _, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if _visible(d)]
        if any(os.path.splitext(f)[1].lower() in DATA_SUFFIXES for f in files):
            return True
    return False


def _local_source(path: Path, cfg: DataConfig, console: Any) -> Source:
    """A save_to_disk folder, parquet/arrow file(s) or, failing those, a folder of images (which never imports
    `datasets`)."""
    saved = path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())
    if path.is_dir() and not saved and not _has_data_files(path):
        cfg.check_no_columns(f"image folder {path}")
        return _folder_source(path)
    if path.is_file() and path.suffix.lower() not in DATA_SUFFIXES:
        raise VQGenError(f"data file {path} is not .parquet or .arrow; pass a folder of images or of data files")
    datasets = _datasets()
    try:  # streaming reads local files in place instead of copying them into the datasets cache
        if saved:
            loaded, origin = datasets.load_from_disk(str(path)), f"saved dataset {path}"
        elif path.is_file():
            builder = DATA_SUFFIXES[path.suffix.lower()]
            loaded, origin = datasets.load_dataset(builder, data_files=str(path), streaming=True), f"file {path}"
        else:
            loaded, origin = datasets.load_dataset(str(path), streaming=True), f"data files in {path}"
    except Exception as err:  # datasets raises many types for a folder it cannot read
        raise VQGenError(f"could not read {path} with datasets: {one_line(err)}") from None
    stamp = file_stamps([path] if path.is_file() else sorted(
        str(p) for p in path.rglob("*") if p.is_file() and _visible_below(p, path)))
    return _datasets_source(loaded, origin, cfg, stamp, console)


def _visible_below(file: Path, folder: Path) -> bool:
    return all(_visible(part) for part in file.relative_to(folder).parts)


def _is_hub_name(source: str) -> bool:
    """owner/name, not a path: one slash, no file suffix, and no local folder called `owner`."""
    if not _HUB_NAME.fullmatch(source):
        return False
    owner, name = source.split("/")
    suffix = os.path.splitext(name)[1].lower()
    return not Path(owner).exists() and suffix not in DATA_SUFFIXES and suffix not in IMAGE_SUFFIXES


def _hub_source(name: str, cfg: DataConfig, console: Any) -> Source:
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
                f"could not load {name!r} from the Hugging Face hub (no network?): {one_line(err)}"
            ) from None
    try:
        loaded = datasets.load_dataset(name)
    except Exception as err:  # offline mode without a cached copy raises ConnectionError
        hint = " (no network?)" if isinstance(err, (ConnectionError, TimeoutError)) else ""
        raise VQGenError(f"could not load {name!r} from the Hugging Face hub{hint}: {one_line(err)}") from None
    return _datasets_source(loaded, f"hub dataset {name}", cfg, console=console)


# --- decoding -------------------------------------------------------------------------------

def find_source(cfg: DataConfig, console: Any = None) -> Source:
    """The splits of `cfg.source` as references, not yet decoded (not for the built-in data); `console`
    shows the progress of a conversion into the Arrow cache."""
    from vqgen.core.runtime.console import make_console

    console = console or make_console()
    path = Path(cfg.source).expanduser()
    if path.exists():
        return _local_source(path, cfg, console)
    if _is_hub_name(cfg.source):
        return _hub_source(cfg.source, cfg, console)
    raise VQGenError(f"data source not found: {cfg.source!r} is no file or folder, nor a hub name (owner/name)")
