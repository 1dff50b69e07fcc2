"""Encode every split of a dataset to integer code grids, across any number of processes."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from rich.console import Console
from torch import nn

from vqgen.core.checkpoint import weights_fingerprint
from vqgen.core.codes import CodeSplit, CodesMeta, save_codes
from vqgen.core.batches import make_loader
from vqgen.core.data.augment import with_augmented_copies
from vqgen.core.data.config import DataConfig, parse_augment
from vqgen.core.data.images import ImageData, ImageDataset, ImageSplit
from vqgen.core.errors import VQGenError
from vqgen.core.layout import RunLayout


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
    out = run.codes
    if accelerator.is_main_process:
        h, w = cfg.grid_shape
        meta = CodesMeta(
            codebook_size=cfg.codebook_size, grid_height=h, grid_width=w,
            num_classes=data.num_classes, class_names=tuple(data.class_names or ()),
            vqvae_fingerprint=weights_fingerprint(run.vqvae.path), vqvae_dir=str(run.vqvae.path.resolve()),
            data_source=data.source, image_channels=data.channels, image_height=data.height, image_width=data.width,
            split_sizes=tuple((k, len(v)) for k, v in splits.items()), train_copies=data_cfg.code_copies,
        )
        save_codes(out, splits, meta)
        console.print(f"codes: {out} ({', '.join(f'{k} {len(v)}' for k, v in splits.items())} grids of {h}x{w})")
    accelerator.wait_for_everyone()
    return out
