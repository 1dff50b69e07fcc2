"""Code grids on disk: the interface between stage 1 and stage 2.

`runs/NAME/codes/` is a `datasets.DatasetDict` saved with `save_to_disk` (one split per
folder; columns `codes` int16 (h', w') and `label` when the source had labels) plus
`meta.json`: codebook size, grid shape, classes and the fingerprint of the VQ-VAE
weights that produced the codes.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vqgen.core.config import load_config, option, save_config
from vqgen.core.errors import VQGenError
from vqgen.core.interrupt import signals_deferred
from vqgen.core.layout import CODES_META as META
from vqgen.core.writes import writing



@dataclass(frozen=True)
class CodesMeta:
    codebook_size: int
    grid_height: int
    grid_width: int
    num_classes: int                  # 0 when the source had no labels
    class_names: tuple[str, ...]      # empty when unlabelled
    vqvae_fingerprint: str            # of the weights that encoded the images
    vqvae_dir: str
    data_source: str
    image_channels: int
    image_height: int
    image_width: int
    split_sizes: tuple[tuple[str, int], ...]
    train_copies: int = option(0, "augmented copies of each training image in the train split", since=2)
    pseudo_labels: bool = option(False, "the labels are clusters of the codes, not classes of the data", since=2)

    def __post_init__(self):
        if self.codebook_size < 2 or self.grid_height < 1 or self.grid_width < 1:
            raise VQGenError(
                f"codes metadata is inconsistent: K={self.codebook_size}, grid {self.grid_height}x{self.grid_width}"
            )
        for name in ("num_classes", "train_copies", "image_channels", "image_height", "image_width"):
            if getattr(self, name) < (0 if name in ("num_classes", "train_copies") else 1):
                raise VQGenError(f"{name} must be >= {0 if name in ('num_classes', 'train_copies') else 1}, "
                                 f"got {getattr(self, name)}")
        if any(size < 0 for _, size in self.split_sizes):
            raise VQGenError(f"split sizes must be >= 0, got {list(self.split_sizes)}")


@dataclass
class CodeSplit:
    codes: Tensor            # int64 (n, h, w)
    labels: Tensor | None    # int64 (n,)

    def __len__(self) -> int:
        return self.codes.shape[0]


def save_codes(folder: str | os.PathLike, splits: dict[str, CodeSplit], meta: CodesMeta) -> None:
    """Write every split and meta.json into a temporary folder, then swap it into place."""
    from datasets import Array2D, Dataset, DatasetDict, Features, Value, disable_progress_bars

    disable_progress_bars()  # vqgen reports what it wrote itself

    folder = Path(folder)
    h, w = meta.grid_height, meta.grid_width
    features = {"codes": Array2D(shape=(h, w), dtype="int16")}
    if meta.num_classes:
        features["label"] = Value("int64")
    parts = {}
    for name, split in splits.items():
        columns = {"codes": split.codes.to(torch.int16).numpy()}
        if meta.num_classes:
            if split.labels is None:
                raise VQGenError(f"split {name!r} has no labels but the codes metadata says {meta.num_classes} classes")
            columns["label"] = split.labels.numpy()
        parts[name] = Dataset.from_dict(columns, features=Features(features))
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(tmp, temporary=tmp):  # a full disk: one line, the old codes untouched, no temporary folder left
        DatasetDict(parts).save_to_disk(str(tmp))
        save_config(meta, tmp / META)
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    with signals_deferred():  # a Ctrl-C between the renames would leave no codes folder at all
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_codes_meta(folder: str | os.PathLike) -> CodesMeta:
    folder = Path(folder)
    if not folder.is_dir():
        raise VQGenError(f"no code grids at {folder} (train stage 1, or run `vqgen encode --run ...`)")
    if not (folder / META).is_file():
        raise VQGenError(f"{folder} has no {META}: not a vqgen codes folder (re-run `vqgen encode`)")
    return load_config(CodesMeta, folder / META)


def load_codes(folder: str | os.PathLike) -> tuple[dict[str, CodeSplit], CodesMeta]:
    """Read every split as int64 tensors, checked against the metadata."""
    from datasets import load_from_disk

    folder = Path(folder)
    meta = load_codes_meta(folder)
    try:
        data = load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as err:
        raise VQGenError(f"cannot read code grids in {folder}: {err}") from None
    splits = {}
    for name in data:
        part = data[name].with_format("numpy")
        codes = torch.from_numpy(np.asarray(part["codes"], dtype=np.int64)) if len(part) else torch.zeros(
            0, meta.grid_height, meta.grid_width, dtype=torch.long)
        if codes.shape[1:] != (meta.grid_height, meta.grid_width):
            raise VQGenError(
                f"codes in {folder}/{name} are {tuple(codes.shape[1:])} but meta.json says "
                f"{meta.grid_height}x{meta.grid_width}"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= meta.codebook_size):
            raise VQGenError(f"codes in {folder}/{name} fall outside [0, {meta.codebook_size})")
        labels = None
        if "label" in part.column_names:
            labels = torch.from_numpy(np.asarray(part["label"], dtype=np.int64))
        splits[name] = CodeSplit(codes=codes, labels=labels)
    return splits, meta
