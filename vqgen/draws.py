"""Who draws which sample, from what: the seed and label of sample i from (seed, i) alone, the share of the
samples each process draws, and putting the shares back together in sample order. `vqgen.run.Run` draws
with these; so do the edits and the benchmarks that seed their own draws."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import Tensor

from stage2_prior.sampling import seeded_choice

SEED_STRIDE = 1_000_003  # sample i of seed s is seeded by s * SEED_STRIDE + i
LABEL_STREAM = 1 << 62   # a label drawn for sample i uses its own generator, apart from the codes'


def sample_seeds(seed: int, indices: Tensor) -> Tensor:
    """(b,) sample indices -> (b,) int64 seeds: sample i depends on (seed, i) alone."""
    return seed * SEED_STRIDE + indices.long()


@dataclass(frozen=True)
class LabelPlan:
    """The labels of n samples, without holding n of them: named ids (one for all, or one per sample), every
    class in turn, or classes drawn with the given frequencies, sample i's from (seed, i) alone; or none."""

    ids: tuple[int, ...] = ()                # given: one for all samples, or one per sample
    cycle: int = 0                           # > 0: sample i gets class i % cycle
    frequencies: tuple[float, ...] = ()      # drawn: sample i's class from these weights
    seed: int = 0

    def of(self, indices: Tensor) -> Tensor | None:
        """(b,) sample indices -> (b,) int64 labels, or None for unconditional samples."""
        if self.ids:
            ids = torch.tensor(self.ids, dtype=torch.long)
            return ids.expand(len(indices)).clone() if len(ids) == 1 else ids[indices]
        if self.cycle:
            return indices.long() % self.cycle
        if self.frequencies:
            weights = torch.tensor(self.frequencies, dtype=torch.double).expand(len(indices), -1)
            return seeded_choice(weights, sample_seeds(self.seed, indices) + LABEL_STREAM)
        return None


def share(n: int, processes: int, index: int) -> tuple[int, int]:
    """The samples [first, last) that process `index` of `processes` draws: consecutive, the first n % processes
    processes one more (as `torch.tensor_split` would cut them), computed without holding n indices."""
    size, extra = divmod(n, processes)
    first = index * size + min(index, extra)
    return first, first + size + (index < extra)


def autocast(accelerator: Accelerator):
    return accelerator.autocast() if accelerator.mixed_precision != "no" else nullcontext()


def gather_shares(accelerator: Accelerator, *parts: Tensor, sizes: list[int]) -> list[Tensor]:
    """Gather uneven per-process shares back into one tensor each, in sample order."""
    largest = max(sizes)
    out = []
    for part in parts:
        padded = torch.zeros(largest, *part.shape[1:], dtype=part.dtype)
        padded[: len(part)] = part
        gathered = accelerator.gather(padded.to(accelerator.device)).cpu()
        gathered = gathered.reshape(accelerator.num_processes, largest, *part.shape[1:])
        out.append(torch.cat([gathered[i, :size] for i, size in enumerate(sizes)]))
    return out
