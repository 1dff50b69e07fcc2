"""Code grids on disk: the interface between stage 1 and stage 2.

`runs/NAME/codes/` holds, per split, shards of int16 grids in dataset order (`layout.codes_shard`,
safetensors, written by `CodesWriter` as the encoder produces them, so the dump is never whole in
memory) and the split's labels, plus `meta.json`: codebook size, grid shape, classes, the shards, and
the fingerprint of the VQ-VAE weights that produced the codes. Codes written by format 2 (one
`datasets.DatasetDict` saved with `save_to_disk`) still load.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vqgen.core.runtime.errors import VQGenError
from vqgen.core.runtime.signals import signals_deferred
from vqgen.core.store.atomic import writing
from vqgen.core.store.configs import load_config, option, save_config
from vqgen.core.store.layout import CODES_META as META
from vqgen.core.store.layout import codes_labels, codes_shard

SHARD_SIZE = 8192  # grids per shard file: 8 MB of int16 32x32 grids



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
    shards: tuple[tuple[str, tuple[str, ...]], ...] = option(
        (), "each split's shard files, in order (none: the codes are a datasets folder, as format 2 wrote)", since=3)
    condition_classes: tuple[int, ...] = option(
        (), "labelled data clustered within each class: the class of each cluster, in order (the prior conditions "
            "on the clusters; none: on the classes)", since=6)

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
        bad = [c for c in self.condition_classes if not 0 <= c < self.num_classes]
        if bad or list(self.condition_classes) != sorted(self.condition_classes):
            raise VQGenError(f"condition_classes must be sorted class ids in [0, {self.num_classes}), "
                             f"got {list(self.condition_classes)}")

    @property
    def num_conditions(self) -> int:
        """What a conditional prior of these codes conditions on: the clusters within classes, else the classes."""
        return len(self.condition_classes) or self.num_classes

    @property
    def distinct_train_grids(self) -> int:
        """The train split's grids less their augmented copies: one per training image. What the priors' sizing
        rules count (length in passes over the images, the little-data rules): copies add variety, not images."""
        return dict(self.split_sizes).get("train", 0) // (1 + self.train_copies)

    @property
    def distinct_train_codes(self) -> int:
        """The codes of `distinct_train_grids`: what the little-data rule counts."""
        return self.distinct_train_grids * self.grid_height * self.grid_width


@dataclass
class CodeSplit:
    codes: Tensor            # int16 (n, h, w) as stored (a quarter of int64's memory); index, then .long()
    labels: Tensor | None    # int64 (n,)
    conditions: Tensor | None = None  # int64 (n,): each grid's cluster within its class, when the dump has them

    def __len__(self) -> int:
        return self.codes.shape[0]

    @property
    def condition_ids(self) -> Tensor | None:
        """What a conditional prior of these grids conditions on: each grid's cluster within its class where
        the dump has them, else its label."""
        return self.labels if self.conditions is None else self.conditions


class CodesWriter:
    """Writes code grids as they are produced: `add` rows of a split in dataset order, each full shard
    goes to disk at once; `finish` writes the labels and meta.json, then swaps the folder into place.
    Everything goes to a temporary folder first: a failure or an interrupt leaves the old codes as they were.
    """

    def __init__(self, folder: str | os.PathLike, shard_size: int | None = None):
        self.folder, self.shard_size = Path(folder), shard_size or SHARD_SIZE
        self.tmp = self.folder.with_name(f".{self.folder.name}.tmp")
        self.shards: dict[str, list[str]] = {}
        self.sizes: dict[str, int] = {}
        self._pending: dict[str, list[Tensor]] = {}
        shutil.rmtree(self.tmp, ignore_errors=True)
        with writing(self.tmp, temporary=self.tmp):
            self.tmp.mkdir(parents=True)

    def add(self, split: str, codes: Tensor) -> None:
        """The next (b, h, w) grids of `split`, in dataset order."""
        pending = self._pending.setdefault(split, [])
        self.shards.setdefault(split, [])
        self.sizes[split] = self.sizes.get(split, 0) + len(codes)
        pending.append(codes.to(torch.int16).cpu())
        while sum(len(c) for c in pending) >= self.shard_size:
            rows = torch.cat(pending)
            self._write(split, rows[: self.shard_size])
            pending[:] = [rows[self.shard_size:]]

    def _write(self, split: str, rows: Tensor) -> None:
        from safetensors.torch import save_file

        path = codes_shard(self.tmp, split, len(self.shards[split]))
        with writing(path, temporary=self.tmp):
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"codes": rows.contiguous()}, str(path))
        self.shards[split].append(str(path.relative_to(self.tmp)))

    def finish(self, meta: CodesMeta, labels: dict[str, Tensor | None],
               conditions: dict[str, Tensor] | None = None) -> None:
        """Flush the last shards, write each split's labels (and clusters within classes, when
        `meta.condition_classes` has them) and meta.json (with the shard list), swap in."""
        from safetensors.torch import save_file

        for split, pending in self._pending.items():
            rows = torch.cat(pending) if pending else torch.zeros(0, dtype=torch.int16)
            if len(rows) or not self.shards[split]:
                self._write(split, rows.reshape(-1, meta.grid_height, meta.grid_width))
        with writing(self.tmp, temporary=self.tmp):
            for split, size in self.sizes.items():
                split_labels = labels.get(split)
                if meta.num_classes and split_labels is None:
                    raise VQGenError(f"split {split!r} has no labels but the codes metadata says "
                                     f"{meta.num_classes} classes")
                if split_labels is not None and meta.num_classes:
                    assert len(split_labels) == size, f"{len(split_labels)} labels for {size} grids of {split}"
                    tensors = {"labels": split_labels.to(torch.int64).contiguous()}
                    if meta.condition_classes:
                        tensors["conditions"] = conditions[split].to(torch.int64).contiguous()
                        assert _clusters_fit(tensors["conditions"], tensors["labels"], meta), \
                            f"a cluster within a class of {split} holds a grid of another class"
                    save_file(tensors, str(codes_labels(self.tmp, split)))
            meta = dataclasses.replace(meta, split_sizes=tuple(self.sizes.items()),
                                       shards=tuple((k, tuple(v)) for k, v in self.shards.items()))
            save_config(meta, self.tmp / META)
        old = self.folder.with_name(f".{self.folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        with signals_deferred():  # a Ctrl-C between the renames would leave no codes folder at all
            if self.folder.exists():
                os.replace(self.folder, old)
            os.replace(self.tmp, self.folder)
        shutil.rmtree(old, ignore_errors=True)

    def abandon(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _clusters_fit(conditions: Tensor, labels: Tensor, meta: CodesMeta) -> bool:
    """Whether (n,) cluster ids are clusters of the metadata, each one of its grid's class (labels (n,)): what a
    prior conditions on must never contradict the label."""
    if len(conditions) != len(labels):
        return False
    if not len(conditions):
        return True
    owners = torch.tensor(meta.condition_classes, dtype=torch.int64)
    return (0 <= int(conditions.min()) and int(conditions.max()) < len(owners)
            and torch.equal(owners[conditions.long()], labels.long()))


def save_codes(folder: str | os.PathLike, splits: dict[str, CodeSplit], meta: CodesMeta) -> None:
    """Write every split (in shards) and meta.json into a temporary folder, then swap it into place."""
    writer = CodesWriter(folder)
    try:
        for name, split in splits.items():
            writer.add(name, split.codes)
        writer.finish(meta, {name: split.labels for name, split in splits.items()},
                      {name: split.conditions for name, split in splits.items()})
    except BaseException:
        writer.abandon()
        raise


def load_codes_meta(folder: str | os.PathLike) -> CodesMeta:
    folder = Path(folder)
    if not folder.is_dir():
        raise VQGenError(f"no code grids at {folder} (train stage 1, or run `vqgen encode --run ...`)")
    if not (folder / META).is_file():
        raise VQGenError(f"{folder} has no {META}: not a vqgen codes folder (re-run `vqgen encode`)")
    return load_config(CodesMeta, folder / META)


def _load_shards(folder: Path, meta: CodesMeta) -> dict[str, CodeSplit]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    sizes, grid = dict(meta.split_sizes), (meta.grid_height, meta.grid_width)
    splits = {}
    for name, files in meta.shards:
        # one int16 tensor of meta.json's size, each shard copied into its rows: no second copy of the split
        codes = torch.empty(sizes.get(name, 0), *grid, dtype=torch.int16)
        at = 0
        try:
            for f in files:
                shard = load_file(str(folder / f))["codes"]
                if tuple(shard.shape[1:]) != grid:
                    raise VQGenError(f"codes in {folder / f} are {tuple(shard.shape[1:])} but meta.json says "
                                     f"{meta.grid_height}x{meta.grid_width}")
                if at + len(shard) > len(codes):
                    raise VQGenError(f"{folder}/{name} holds more code grids than the {len(codes)} of meta.json")
                codes[at:at + len(shard)] = shard
                at += len(shard)
            if at != len(codes):
                raise VQGenError(f"{folder}/{name} holds {at} code grids but meta.json says {len(codes)}")
            labels_file = codes_labels(folder, name)
            stored = load_file(str(labels_file)) if labels_file.is_file() else {}
            labels, conditions = (stored["labels"], stored.get("conditions")) if stored else (None, None)
        except (OSError, KeyError, SafetensorError) as err:
            raise VQGenError(f"cannot read code grids in {folder}/{name}: {err}") from None
        if meta.condition_classes and labels is not None and conditions is None:
            raise VQGenError(f"{labels_file} holds no clusters within classes, but {folder / META} names "
                             f"{len(meta.condition_classes)} (re-run `vqgen encode`)")
        for what, values in (("labels", labels), ("clusters within classes", conditions)):
            if values is not None and len(values) != len(codes):
                raise VQGenError(f"{folder}/{name} has {len(values)} {what} for {len(codes)} code grids")
        if meta.condition_classes and conditions is not None and not _clusters_fit(conditions, labels, meta):
            raise VQGenError(f"{labels_file}: its clusters within classes do not match {folder / META} and the "
                             "labels (re-run `vqgen encode`)")
        splits[name] = CodeSplit(codes=codes, labels=labels, conditions=conditions if meta.condition_classes else None)
    return splits


def _load_dataset_dict(folder: Path, meta: CodesMeta) -> dict[str, CodeSplit]:
    """Codes as format 2 wrote them: a `datasets.DatasetDict` saved with `save_to_disk`."""
    from datasets import load_from_disk

    try:
        data = load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as err:
        raise VQGenError(f"cannot read code grids in {folder}: {err}") from None
    splits = {}
    for name in data:
        part = data[name].with_format("numpy")
        codes = torch.from_numpy(np.asarray(part["codes"], dtype=np.int16)) if len(part) else torch.zeros(
            0, meta.grid_height, meta.grid_width, dtype=torch.int16)
        labels = None
        if "label" in part.column_names:
            labels = torch.from_numpy(np.asarray(part["label"], dtype=np.int64))
        splits[name] = CodeSplit(codes=codes, labels=labels)
    return splits


def load_codes(folder: str | os.PathLike) -> tuple[dict[str, CodeSplit], CodesMeta]:
    """Read every split's grids as one int16 tensor (from its shards, or a format-2 datasets folder), checked
    against the metadata. Stage 2 holds them so: 1M grids of 16x16 take 512 MiB, not int64's 2 GiB."""
    folder = Path(folder)
    meta = load_codes_meta(folder)
    splits = _load_shards(folder, meta) if meta.shards else _load_dataset_dict(folder, meta)
    for name, split in splits.items():
        codes = split.codes
        if codes.shape[1:] != (meta.grid_height, meta.grid_width):
            raise VQGenError(
                f"codes in {folder}/{name} are {tuple(codes.shape[1:])} but meta.json says "
                f"{meta.grid_height}x{meta.grid_width}"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= meta.codebook_size):
            raise VQGenError(f"codes in {folder}/{name} fall outside [0, {meta.codebook_size})")
    return splits, meta
