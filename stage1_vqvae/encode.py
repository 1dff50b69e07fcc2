"""Encode every split of a dataset to integer code grids, across any number of processes, straight to disk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from rich.console import Console
from torch import nn

from stage1_vqvae.quantizer import kmeans, nearest_codes
from vqgen.core.data.augment import with_augmented_copies
from vqgen.core.data.config import DataConfig, parse_augment
from vqgen.core.data.images import ImageData, ImageDataset, ImageSplit
from vqgen.core.data.loaders import make_loader
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.runtime.processes import raise_together
from vqgen.core.store.codes import CodesMeta, CodesWriter
from vqgen.core.store.layout import RunLayout
from vqgen.core.store.weights import weights_fingerprint

# Clusters of an unlabelled folder, by its size (README, "Unlabelled images"): more clusters carry more of
# what labels would, but each needs enough images for the prior to learn what sets it apart. Measured
# at 10 and 50 with priors at equal budgets: MNIST (60k) 0.53 -> 0.33 in-domain FID at --cfg 1 with 50;
# the shapes (10k) 6.08 -> 7.64 and OpenMoji (2.2k) 1.57 -> 1.55, so those keep 10.
IMAGES_PER_CLUSTER = 1000
FEWEST_CLUSTERS, MOST_CLUSTERS = 10, 50


def default_pseudo_classes(train_images: int) -> int:
    """How many clusters stand in for classes when the data has none: one per IMAGES_PER_CLUSTER training
    images, within [FEWEST_CLUSTERS, MOST_CLUSTERS]."""
    return min(MOST_CLUSTERS, max(FEWEST_CLUSTERS, round(train_images / IMAGES_PER_CLUSTER)))


# Clusters within each class of labelled data (docs/unlabelled.md, "Labelled folders"): off unless asked for
# (`--class-clusters K`). Measured on one stage 1 each, priors at equal budgets, in-domain FID at --cfg 1.5 over
# two sampling seeds: 4 per class made OpenMoji 32 px 8 % better than its 11 classes but the shapes 15 % worse,
# so the classes alone stay the default; against today's labelled default (the class in every block) 4 per class
# drew 2,000 digits 16 % better, OpenMoji 32 px level with less of the class (docs/benchmarks.md, "Clusters within
# classes, with the class in every block"). K per class at most, and one per IMAGES_PER_CLASS_CLUSTER of the
# class's training images, so a small class keeps fewer.
CLASS_CLUSTERS = 0
IMAGES_PER_CLASS_CLUSTER = 50


def clusters_per_class(class_sizes: list[int], most: int | None) -> list[int]:
    """How many clusters each class of labelled data is split into: `most` (CLASS_CLUSTERS when None) at
    most, one per IMAGES_PER_CLASS_CLUSTER of its training images, and at least one (a class too small to
    split, or `most` 0, keeps one: its class alone)."""
    most = CLASS_CLUSTERS if most is None else most
    return [max(1, min(most, size // IMAGES_PER_CLASS_CLUSTER)) for size in class_sizes]


@torch.no_grad()
def encode_split(accelerator: Accelerator, model: nn.Module, split: ImageSplit, batch_size: int,
                 num_workers: int | None = None) -> Iterator[torch.Tensor]:
    """(n, c, H, W) images -> (b, h, w) int64 codes, batch after batch in dataset order, on every process.

    Each process encodes its share of a step's batches; `gather_for_metrics` joins them (dropping the
    padding Accelerate adds to even out the last step), and the gathered indices, checked to continue
    where the last step ended, put every grid in its place: each image once, in order.
    """
    model.eval()
    loader = accelerator.prepare(make_loader(ImageDataset(split), batch_size, num_workers=num_workers))
    done = 0
    for batch in loader:
        codes = model.encode(batch["image"].to(accelerator.device))
        index, codes = accelerator.gather_for_metrics((batch["index"], codes))
        index, order = index.cpu().sort()
        assert torch.equal(index, torch.arange(done, done + len(index))), "encoding lost or duplicated images"
        done += len(index)
        yield codes.cpu()[order]
    assert done == len(split), f"encoded {done} of {len(split)} images"


FEATURE_DIM = 256  # numbers kept per grid for the clustering of unlabelled data
MAX_FEATURE_INPUT = 65_536  # numbers of a grid the projection reads (its matrix: at most 64 MiB)


class GridFeatures:
    """(n, h, w) codes -> (n, f) features for clustering unlabelled images: each whole grid of code
    vectors, multiplied by a fixed random (d*h*w, FEATURE_DIM) matrix.

    The whole grid, not an average of it: where a stroke or an object lies is most of what tells
    images apart. On MNIST, 10 clusters of these features match the digits with NMI 0.47-0.52, of the
    grid's four quarter-averages (the features before) only 0.15-0.16; on OpenMoji and the shapes the
    gain is smaller but on the same side (README, "Unlabelled images"). A random projection keeps
    distances nearly intact (Johnson-Lindenstrauss) while the features stay small for any dataset.
    A grid of more than MAX_FEATURE_INPUT numbers is average-pooled by 2 until it fits; one of at most
    FEATURE_DIM numbers is its own feature.
    """

    def __init__(self, cfg, seed: int, dim: int = FEATURE_DIM):
        h, w = cfg.grid_shape
        while cfg.code_dim * h * w > MAX_FEATURE_INPUT and max(h, w) > 1:
            h, w = -(-h // 2), -(-w // 2)
        self.grid = (h, w)
        size = cfg.code_dim * h * w
        self.projection = None if size <= dim else (
            torch.randn(size, dim, generator=torch.Generator().manual_seed(seed)) / dim ** 0.5)

    @torch.no_grad()
    def __call__(self, model: nn.Module, codes: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        device = model.quantizer.codebook.device
        parts = []
        for c in codes.split(chunk):
            grid = model.quantizer.decode_indices(c.to(device)).float()  # (b, d, h, w)
            if tuple(grid.shape[-2:]) != self.grid:
                grid = F.adaptive_avg_pool2d(grid, self.grid)
            grid = grid.flatten(1).cpu()
            parts.append(grid if self.projection is None else grid @ self.projection)
        return torch.cat(parts)


def cluster_features(x_train: torch.Tensor, x_test: torch.Tensor, k: int,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, f) train and (m, f) test features -> (n,), (m,) cluster ids in [0, k): k-means on the standardised
    training features, test features to the nearest centre. Deterministic for a seed."""
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    centres = kmeans(x_train, k, iters=25, generator=torch.Generator().manual_seed(seed))
    return nearest_codes(x_train, centres), nearest_codes(x_test, centres)


def cluster_within_classes(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                           per_class: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Features and labels of both splits, clusters per class -> each grid's cluster id (train (n,), test (m,))
    and the class of each cluster. Class c's clusters are numbered after those of the classes before it; its
    test grids go to the nearest of its own centres, so a grid's cluster always lies within its class."""
    conditions = {"train": torch.empty_like(y_train), "test": torch.empty_like(y_test)}
    owners: list[int] = []
    for c, k in enumerate(per_class):
        train, test = y_train == c, y_test == c
        if k > 1:
            ids = cluster_features(x_train[train], x_test[test], k, seed=seed + c)
        else:
            ids = torch.zeros(int(train.sum()), dtype=torch.long), torch.zeros(int(test.sum()), dtype=torch.long)
        conditions["train"][train] = len(owners) + ids[0]
        conditions["test"][test] = len(owners) + ids[1]
        owners += [c] * k
    return conditions["train"], conditions["test"], tuple(owners)


class _MainWriter:
    """The main process's `CodesWriter`. A failed write (a full disk) stops the writing, not the encoding:
    every process must still join each gather, and they all stop together at the end."""

    def __init__(self, folder: Path, main: bool):
        self.writer, self.error = None, None
        if main:
            try:
                self.writer = CodesWriter(folder)
            except VQGenError as err:
                self.error = str(err)

    def __call__(self, method: str, *args) -> None:
        if self.writer is not None and self.error is None:
            try:
                getattr(self.writer, method)(*args)
            except VQGenError as err:
                self.error = str(err)
                self.writer.abandon()

    def abandon(self) -> None:
        if self.writer is not None:
            self.writer.abandon()


def encode_splits(
    accelerator: Accelerator, model: nn.Module, data: ImageData, data_cfg: DataConfig, run: RunLayout,
    batch_size: int, console: Console, num_workers: int | None = None,
) -> Path:
    """Encode train (with `data_cfg.code_copies` augmented copies of each image) and test; the main
    process writes the grids shard by shard as they come, then the labels (or, for unlabelled data,
    clusters of the codes) and the metadata. No split's codes are ever held whole."""
    cfg = model.config
    if (data.channels, data.height, data.width) != (cfg.in_channels, cfg.image_height, cfg.image_width):
        raise VQGenError(f"the data has {data.channels}x{data.height}x{data.width} images but the VQ-VAE in "
                         f"{run.vqvae.path} expects {cfg.in_channels}x{cfg.image_height}x{cfg.image_width}")
    main, out = accelerator.is_main_process, run.codes
    class_names = tuple(data.class_names or ())
    clusters = (data_cfg.pseudo_classes if data_cfg.pseudo_classes is not None
                else default_pseudo_classes(len(data.train)))
    clustering = not class_names and bool(clusters) and main  # unlabelled: clusters of the codes stand in
    train = with_augmented_copies(data.train, parse_augment(data_cfg.augment), data_cfg.code_copies, data_cfg.seed)
    per_class = (clusters_per_class(torch.bincount(train.labels, minlength=len(class_names)).tolist(),
                                    data_cfg.class_clusters) if class_names else [])
    within = any(k > 1 for k in per_class) and main  # labelled: clusters within each class, beside the labels
    write = _MainWriter(out, main)
    grid_features = GridFeatures(cfg, seed=data_cfg.seed) if clustering or within else None
    try:
        split_labels, features = {}, {}
        for name, split in (("train", train), ("test", data.test)):
            parts = []
            for codes in encode_split(accelerator, model, split, batch_size, num_workers):
                write("add", name, codes)
                if grid_features is not None:  # FEATURE_DIM numbers per grid, not the grid: the features stay small
                    parts.append(grid_features(model, codes))
            features[name] = torch.cat(parts) if parts else None
            split_labels[name] = split.labels
        if main and write.error is None:  # the clustering and the metadata: once, on the main process
            if clustering:
                split_labels["train"], split_labels["test"] = cluster_features(
                    features["train"], features["test"], clusters, seed=data_cfg.seed)
                class_names = tuple(f"cluster{i}" for i in range(clusters))
                console.print(f"no labels: {clusters} clusters of the codes stand in for classes (sizes "
                              f"{torch.bincount(split_labels['train'], minlength=clusters).tolist()}; "
                              "--pseudo-classes 0 turns this off)")
            conditions, owners = {}, ()
            if within:
                conditions["train"], conditions["test"], owners = cluster_within_classes(
                    features["train"], split_labels["train"], features["test"], split_labels["test"], per_class,
                    seed=data_cfg.seed)
                sizes = torch.bincount(conditions["train"], minlength=len(owners)).split(per_class)
                console.print(f"{len(owners)} clusters within the {len(class_names)} classes (sizes "
                              f"{[s.tolist() for s in sizes]}; --class-clusters 0 turns this off)")
            h, w = cfg.grid_shape
            meta = CodesMeta(
                codebook_size=cfg.codebook_size, grid_height=h, grid_width=w, num_classes=len(class_names),
                class_names=class_names, pseudo_labels=bool(class_names) and not data.class_names,
                vqvae_fingerprint=weights_fingerprint(run.vqvae.path), vqvae_dir=str(run.vqvae.path.resolve()),
                data_source=data.source, image_channels=data.channels, image_height=data.height,
                image_width=data.width, split_sizes=(("train", len(train)), ("test", len(data.test))),
                train_copies=data_cfg.code_copies, condition_classes=owners,
            )
            write("finish", meta, split_labels, conditions)
            if write.error is None:
                shards = sum(len(v) for v in write.writer.shards.values())
                console.print(f"codes: {out} (train {len(train)}, test {len(data.test)} grids of {h}x{w}, "
                              f"{shards} shards)")
    except BaseException:
        write.abandon()
        raise
    raise_together(accelerator, write.error, main_only=True)
    return out
