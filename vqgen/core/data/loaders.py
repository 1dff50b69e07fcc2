"""Datasets that serve whole batches, and the loaders over them.

A `BatchDataset` answers `batch(indices)` with one indexing op per tensor; `make_loader` hands the
sampler's indices to it in one call (through the DataLoader's `__getitems__` hook, on a wrapper, so
that a plain DataLoader over the same dataset still gets items) instead of n items. The sampler, in
the main process, decides the order; workers only build the batches they are handed, so the batches
are the same for any number of workers.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os

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


def default_workers(dataset: Dataset) -> int:
    """Loader processes when none are asked for: none for data in memory (a batch is one indexing op),
    up to 4 for a streamed dataset, whose batches are decoded image by image."""
    return min(4, os.cpu_count() or 1) if getattr(dataset, "streamed", False) else 0


def _mmap_large_buffers(worker_id: int) -> None:
    """Buffers over 128 KiB from mmap, returned to the system when freed, in each worker and in the main
    process. glibc raises that threshold after the first freed batch; from then on batch-sized buffers
    come from the heap, which only grows as batches move through shared memory (measured at 32x3x128x128:
    a worker +6 MB per batch, over 1 GB after 150 batches; the main process +500 MB over a 63-batch
    evaluation; both flat with this)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD; fixing it ends the raising
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def make_loader(dataset: Dataset, batch_size: int, train: bool = False, seed: int = 0,
                num_workers: int | None = None) -> DataLoader:
    """A DataLoader with its own generator: iterating it never draws from the global RNG, so
    evaluations and a resumed epoch leave the training randomness exactly as it was.

    num_workers: loader processes (None: `default_workers`). A training loader's workers persist from
    epoch to epoch (until `stop_workers`); an evaluation's end with each pass, so that idle workers do
    not hold memory between evaluations. Batches go to pinned memory when CUDA is there to copy from it."""
    workers = default_workers(dataset) if num_workers is None else num_workers
    if workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {workers}")
    if isinstance(dataset, BatchDataset):
        dataset = _Batched(dataset)
    if workers > 0:
        _mmap_large_buffers(-1)  # the main process receives the workers' batches
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=train,
                      generator=torch.Generator().manual_seed(seed), collate_fn=_collate,
                      num_workers=workers, persistent_workers=train and workers > 0,
                      pin_memory=torch.cuda.is_available(),
                      worker_init_fn=_mmap_large_buffers if workers > 0 else None,
                      multiprocessing_context=worker_context() if workers > 0 else None)


# Modules the fork server imports once, so that each worker it forks starts with them loaded
WORKER_PRELOAD = ("torch", "vqgen.core.data.images")


def worker_context() -> multiprocessing.context.BaseContext | None:
    """Where loader workers come from: a fork server, which forks them from a process that never ran a thread.

    A worker forked from the training process itself (Linux's default) can deadlock before it runs a line: CPython
    3.11's child clears the other threads' states under a lock that one of them may have held at the fork (a thread
    entering Python from C, say), and nothing ever releases it. That hung a two-process streamed run at an
    evaluation's fork, in CI and on a busy 2-core machine. A fork server is started once per process (about a second
    for its imports) and its forks are as fast as direct ones. None (the platform's default) where there is no fork
    server (Windows, which spawns).
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(WORKER_PRELOAD))
    return context


def stop_workers(loader: DataLoader) -> None:
    """End the worker processes a loader keeps between epochs (`persistent_workers`), now rather than at exit."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


def _collate(batch: dict[str, Tensor] | list) -> dict[str, Tensor]:
    """Batches from `_Batched` arrive ready; per-item lists are stacked as usual."""
    return batch if isinstance(batch, dict) else default_collate(batch)
