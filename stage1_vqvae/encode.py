"""Encode every split of a dataset to integer code grids, across any number of processes."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from rich.console import Console
from torch import nn

from stage1_vqvae.quantizer import kmeans, nearest_codes
from vqgen.core.agree import raise_together
from vqgen.core.batches import make_loader
from vqgen.core.checkpoint import weights_fingerprint
from vqgen.core.codes import CodeSplit, CodesMeta, save_codes
from vqgen.core.data.augment import with_augmented_copies
from vqgen.core.data.config import DataConfig, parse_augment
from vqgen.core.data.images import ImageData, ImageDataset, ImageSplit
from vqgen.core.errors import VQGenError
from vqgen.core.layout import RunLayout

DEFAULT_PSEUDO_CLASSES = 10  # README, "Unlabelled images"


@torch.no_grad()
def encode_split(accelerator: Accelerator, model: nn.Module, split: ImageSplit, batch_size: int) -> torch.Tensor:
    """(n, c, H, W) images -> (n, h, w) int64 codes, in dataset order.

    Each process encodes a shard; `gather_for_metrics` drops the padding Accelerate adds to
    even out the last batch, and the gathered indices put every grid back in its place.
    """
    model.eval()
    loader = accelerator.prepare(make_loader(ImageDataset(split), batch_size))
    indices, grids = [], []
    for batch in loader:
        codes = model.encode(batch["image"].to(accelerator.device))
        index, codes = accelerator.gather_for_metrics((batch["index"], codes))
        indices.append(index.cpu())
        grids.append(codes.cpu())
    n = len(split.images)
    index, grids = torch.cat(indices), torch.cat(grids)
    assert index.numel() == n and torch.equal(index.sort().values, torch.arange(n)), "encoding lost or duplicated images"
    out = torch.empty_like(grids)
    out[index] = grids
    return out


@torch.no_grad()
def cluster_codes(model: nn.Module, train: torch.Tensor, test: torch.Tensor, k: int, seed: int,
                  chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, h, w) train and (m, h, w) test codes -> (n,), (m,) cluster ids in [0, k).

    Each grid is described by its code vectors averaged over the four quarters of the grid (layout
    and content, 4d numbers), standardised; k-means on the training grids, test grids to the nearest
    centre. Deterministic for a seed.
    """
    def features(codes: torch.Tensor) -> torch.Tensor:
        device = model.quantizer.codebook.device
        parts = [F.adaptive_avg_pool2d(model.quantizer.decode_indices(c.to(device)).float(), 2).flatten(1).cpu()
                 for c in codes.split(chunk)]
        return torch.cat(parts)  # (n, 4d)

    x_train, x_test = features(train), features(test)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    centres = kmeans(x_train, k, iters=25, generator=torch.Generator().manual_seed(seed))
    return nearest_codes(x_train, centres), nearest_codes(x_test, centres)


def encode_splits(
    accelerator: Accelerator, model: nn.Module, data: ImageData, data_cfg: DataConfig, run: RunLayout,
    batch_size: int, console: Console,
) -> Path:
    """Encode train (with `data_cfg.code_copies` augmented copies of each image) and test, then (main
    process) write the run's codes with their metadata."""
    cfg = model.config
    if (data.channels, data.height, data.width) != (cfg.in_channels, cfg.image_height, cfg.image_width):
        raise VQGenError(f"the data has {data.channels}x{data.height}x{data.width} images but the VQ-VAE in "
                         f"{run.vqvae.path} expects {cfg.in_channels}x{cfg.image_height}x{cfg.image_width}")
    splits = {}
    train = with_augmented_copies(data.train, parse_augment(data_cfg.augment), data_cfg.code_copies, data_cfg.seed)
    for name, split in (("train", train), ("test", data.test)):
        codes = encode_split(accelerator, model, split, batch_size)
        splits[name] = CodeSplit(codes=codes, labels=split.labels)
    out, error = run.codes, None
    if accelerator.is_main_process:  # the clustering and the writing: once, on the main process
        class_names = tuple(data.class_names or ())
        clusters = data_cfg.pseudo_classes if data_cfg.pseudo_classes is not None else DEFAULT_PSEUDO_CLASSES
        if not class_names and clusters:  # unlabelled: clusters of the codes stand in for classes
            train_labels, test_labels = cluster_codes(model, splits["train"].codes, splits["test"].codes, clusters,
                                                      seed=data_cfg.seed)
            splits = {"train": CodeSplit(splits["train"].codes, train_labels),
                      "test": CodeSplit(splits["test"].codes, test_labels)}
            class_names = tuple(f"cluster{i}" for i in range(clusters))
            console.print(f"no labels: {clusters} clusters of the codes stand in for classes (sizes "
                          f"{torch.bincount(train_labels, minlength=clusters).tolist()}; "
                          "--pseudo-classes 0 turns this off)")
        h, w = cfg.grid_shape
        meta = CodesMeta(
            codebook_size=cfg.codebook_size, grid_height=h, grid_width=w, num_classes=len(class_names),
            class_names=class_names, pseudo_labels=bool(class_names) and not data.class_names,
            vqvae_fingerprint=weights_fingerprint(run.vqvae.path), vqvae_dir=str(run.vqvae.path.resolve()),
            data_source=data.source, image_channels=data.channels, image_height=data.height, image_width=data.width,
            split_sizes=tuple((k, len(v)) for k, v in splits.items()), train_copies=data_cfg.code_copies,
        )
        try:
            save_codes(out, splits, meta)
            console.print(f"codes: {out} ({', '.join(f'{k} {len(v)}' for k, v in splits.items())} grids of {h}x{w})")
        except VQGenError as err:  # a full disk: every process stops with the same line
            error = str(err)
    raise_together(accelerator, error, main_only=True)
    return out
