"""Datasets that serve whole batches, and the loaders over them.

A `BatchDataset` answers `batch(indices)` with one indexing op per tensor; `make_loader` hands the
sampler's indices to it in one call (through the DataLoader's `__getitems__` hook, on a wrapper, so
that a plain DataLoader over the same dataset still gets items) instead of n items.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate


class BatchDataset(Dataset):
    """Subclasses implement `__len__` and `batch`; one item is a batch of one."""

    def batch(self, indices: list[int]) -> dict[str, Tensor]:
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[0] for k, v in self.batch([i]).items()}



class _Batched(Dataset):
    """Lets the DataLoader fetch a batch with one `dataset.batch(indices)` call."""

    def __init__(self, dataset: BatchDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.dataset[i]

    def __getitems__(self, indices: list[int]) -> dict[str, Tensor]:
        return self.dataset.batch(indices)


def make_loader(dataset: Dataset, batch_size: int, train: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader with its own generator: iterating it never draws from the global RNG, so
    evaluations and a resumed epoch leave the training randomness exactly as it was."""
    if isinstance(dataset, BatchDataset):
        dataset = _Batched(dataset)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=train,
                      generator=torch.Generator().manual_seed(seed), collate_fn=_collate)


def _collate(batch: dict[str, Tensor] | list) -> dict[str, Tensor]:
    """Batches from `_Batched` arrive ready; per-item lists are stacked as usual."""
    return batch if isinstance(batch, dict) else default_collate(batch)
