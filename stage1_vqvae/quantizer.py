"""Vector quantization (van den Oord et al. 2017) with a codebook that stays healthy.

The six steps of the paper, each a small pure function below:
flatten -> squared distances to the K codes -> argmin -> look-up -> reshape back
-> straight-through copy of the decoder's gradient from z_q to z_e.

`VectorQuantizer` wires them together and keeps the codebook alive: it is initialised
from encoder outputs (k-means on the first batch), codes unused for `restart_after`
steps are restarted from current encoder outputs, and every statistic kept outside
autograd (EMA sums, usage counters) is all-reduced, so every process holds the same
codebook at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

# --- the six steps -------------------------------------------------------------------


def flatten_vectors(z: Tensor) -> Tensor:
    """(b, d, h, w) -> (b*h*w, d): one row per spatial position."""
    return rearrange(z, "b d h w -> (b h w) d")


def squared_distances(z: Tensor, codebook: Tensor) -> Tensor:
    """(m, d), (k, d) -> (m, k) squared Euclidean distances, always in fp32.

    Expanded as |z|^2 - 2 z.e + |e|^2: one matmul instead of an (m, k, d) difference.
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        z, codebook = z.float(), codebook.float()
        return (
            z.pow(2).sum(1, keepdim=True)
            - 2.0 * z @ codebook.t()
            + codebook.pow(2).sum(1)[None, :]
        )


def nearest_codes(z: Tensor, codebook: Tensor) -> Tensor:
    """(m, d), (k, d) -> (m,) index of the nearest codebook row (argmin has no gradient)."""
    return squared_distances(z, codebook).argmin(dim=1)


def lookup(indices: Tensor, codebook: Tensor) -> Tensor:
    """(...,) indices, (k, d) -> (..., d) codebook vectors."""
    return F.embedding(indices, codebook)


def unflatten_vectors(v: Tensor, b: int, h: int, w: int) -> Tensor:
    """(b*h*w, d) -> (b, d, h, w), the inverse of `flatten_vectors`."""
    return rearrange(v, "(b h w) d -> b d h w", b=b, h=h, w=w)


def straight_through(z_e: Tensor, z_q: Tensor) -> Tensor:
    """Value of z_q, gradient of z_e. Written as sg[z_q] + (z_e - sg[z_e]) rather than z_e + sg[z_q - z_e]:
    the added term is exactly zero, so the value is z_q to the bit and decoding the codes later gives
    exactly what the training forward pass decoded."""
    return z_q.detach() + (z_e - z_e.detach())


# --- losses and codebook maintenance ---------------------------------------------------


def vq_losses(z_e: Tensor, z_q: Tensor) -> tuple[Tensor, Tensor]:
    """Codebook term |sg[z_e] - e|^2 (moves codes) and commitment |z_e - sg[e]|^2 (moves encoder).

    β multiplies the commitment term, not the codebook term: see `VectorQuantizer`.
    """
    codebook_loss = F.mse_loss(z_q, z_e.detach())
    commitment_loss = F.mse_loss(z_e, z_q.detach())
    return codebook_loss, commitment_loss


def ema_update(
    cluster_size: Tensor, embed_sum: Tensor, counts: Tensor, sums: Tensor, decay: float, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """One EMA step: (k,), (k, d) running stats + this step's (k,) counts, (k, d) sums.

    Returns new cluster sizes, new sums and the codebook they imply, with Laplace smoothing
    so that a code with no assignments never divides by zero.
    """
    cluster_size = decay * cluster_size + (1 - decay) * counts
    embed_sum = decay * embed_sum + (1 - decay) * sums
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + cluster_size.numel() * eps) * n
    return cluster_size, embed_sum, embed_sum / smoothed[:, None]


def kmeans(x: Tensor, k: int, iters: int, generator: torch.Generator | None = None) -> Tensor:
    """(m, d) -> (k, d) centroids by Lloyd's algorithm, seeded with k sampled rows."""
    m = x.shape[0]
    if m >= k:
        start = torch.randperm(m, generator=generator, device="cpu")[:k]
    else:  # fewer vectors than codes: repeat some of them
        start = torch.randint(m, (k,), generator=generator, device="cpu")
    centroids = x[start.to(x.device)].clone()
    for _ in range(iters):
        assign = nearest_codes(x, centroids)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce_sum(t: Tensor) -> Tensor:
    if _world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _broadcast_from_main(t: Tensor) -> Tensor:
    if _world_size() > 1:
        dist.broadcast(t, src=0)
    return t


# --- the module ----------------------------------------------------------------------


@dataclass
class QuantizerOutput:
    z_q: Tensor              # (b, d, h, w) straight-through quantized vectors
    indices: Tensor          # (b, h, w) int64 codes
    loss: Tensor             # codebook + beta * commitment (codebook term 0 under EMA)
    codebook_loss: Tensor
    commitment_loss: Tensor
    counts: Tensor           # (k,) code counts of this batch (summed over processes in training)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantization with straight-through gradients and a healthy codebook."""

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        beta: float = 0.25,
        update: str = "loss",
        ema_decay: float = 0.99,
        ema_eps: float = 1e-5,
        kmeans_init: bool = True,
        restart_after: int = 20,
    ):
        super().__init__()
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.beta, self.update = beta, update
        self.ema_decay, self.ema_eps = ema_decay, ema_eps
        self.restart_after = restart_after
        init = torch.randn(codebook_size, code_dim) / code_dim**0.5
        if update == "loss":
            self.codebook = nn.Parameter(init)
        else:  # EMA: the codebook is a statistic, not a parameter
            self.register_buffer("codebook", init)
            self.register_buffer("ema_cluster_size", torch.zeros(codebook_size))
            self.register_buffer("ema_sum", init.clone())
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self.register_buffer("unused_steps", torch.zeros(codebook_size, dtype=torch.long))

    def forward(self, z_e: Tensor) -> QuantizerOutput:
        """(b, d, h, w) encoder output -> quantized output, codes and losses."""
        b, _, h, w = z_e.shape
        flat = flatten_vectors(z_e).float()  # (m, d), m = b*h*w
        if self.training:
            self._maintain(flat.detach())
        indices = nearest_codes(flat.detach(), self.codebook)  # (m,)
        z_q = unflatten_vectors(lookup(indices, self.codebook), b, h, w)  # (b, d, h, w), fp32
        z_e32 = z_e.float()
        codebook_loss, commitment_loss = vq_losses(z_e32, z_q)
        if self.update == "ema":
            codebook_loss = codebook_loss.detach() * 0  # the EMA moves the codes instead
        loss = codebook_loss + self.beta * commitment_loss
        counts = torch.bincount(indices, minlength=self.codebook_size)
        if self.training:
            counts = _all_reduce_sum(counts)
            self._track_usage(counts)
            if self.update == "ema":
                self._ema_step(flat.detach(), indices, counts)
        return QuantizerOutput(
            z_q=straight_through(z_e32, z_q),
            indices=rearrange(indices, "(b h w) -> b h w", b=b, h=h, w=w),
            loss=loss,
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
            counts=counts,
        )

    def decode_indices(self, indices: Tensor) -> Tensor:
        """(b, h, w) codes -> (b, d, h, w) codebook vectors."""
        return rearrange(lookup(indices, self.codebook), "b h w d -> b d h w")

    @property
    def dead_codes(self) -> int:
        """Codes not chosen for `restart_after` steps or more (restarted on the next step)."""
        limit = self.restart_after if self.restart_after > 0 else 1
        return int((self.unused_steps >= limit).sum())

    # -- maintenance: runs in training only, identically on every process --------------
    # Neither k-means nor the restarts read a tensor value on the host after the first step, so a
    # training step never waits for the device here.

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._known_initialized = False  # the loaded flag may say either

    @torch.no_grad()
    def _maintain(self, flat: Tensor) -> None:
        if not getattr(self, "_known_initialized", False):
            if not bool(self.initialized):  # one device sync, on the first training step only
                self._set_codes(torch.ones(self.codebook_size, dtype=torch.bool, device=flat.device),
                                kmeans(flat, self.codebook_size, 10))
                self.initialized.fill_(True)
            self._known_initialized = True
        if self.restart_after > 0:
            dead = self.unused_steps >= self.restart_after  # (k,)
            pick = torch.randint(flat.shape[0], (self.codebook_size,), device=flat.device)
            self._set_codes(dead, flat[pick])
            self.unused_steps.masked_fill_(dead, 0)

    def _set_codes(self, rows: Tensor, vectors: Tensor) -> None:
        """Overwrite the codebook rows where `rows` (k,) is true by `vectors` (k, d) of the main process."""
        vectors = _broadcast_from_main(vectors.contiguous().to(self.codebook.dtype))
        self.codebook.data.copy_(torch.where(rows[:, None], vectors, self.codebook.data))
        if self.update == "ema":
            self.ema_cluster_size.masked_fill_(rows, 1.0)
            self.ema_sum.copy_(torch.where(rows[:, None], vectors, self.ema_sum))

    @torch.no_grad()
    def _track_usage(self, counts: Tensor) -> None:
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)

    @torch.no_grad()
    def _ema_step(self, flat: Tensor, indices: Tensor, counts: Tensor) -> None:
        sums = torch.zeros_like(self.ema_sum).index_add_(0, indices, flat)
        sums = _all_reduce_sum(sums)
        size, total, codebook = ema_update(
            self.ema_cluster_size, self.ema_sum, counts.float(), sums, self.ema_decay, self.ema_eps
        )
        self.ema_cluster_size.copy_(size)
        self.ema_sum.copy_(total)
        self.codebook.copy_(codebook)
