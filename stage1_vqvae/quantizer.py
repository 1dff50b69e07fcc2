"""Vector quantization (van den Oord et al. 2017) with a codebook that stays healthy.

The six steps of the paper, each a small pure function below:
flatten -> squared distances to the K codes -> argmin -> look-up -> reshape back
-> straight-through copy of the decoder's gradient from z_q to z_e.

`VectorQuantizer` wires them together and keeps the codebook alive: it is initialised
from encoder outputs (k-means on the first batch), codes unused for `restart_after`
steps are restarted from current encoder outputs, and every statistic kept outside
autograd (EMA sums, usage counters) is all-reduced, so every process holds the same
codebook at every step.

Factorised codes (`lookup_dim > 0`, as in ViT-VQGAN and LlamaGen): the search happens in a
low-dimensional space, z_e projected to `lookup_dim` and l2-normalised, against l2-normalised codes
(nearest by cosine); the chosen code is projected back up to `code_dim` for the decoder. The losses,
straight-through, k-means, restarts and EMA keep their definitions, in that lookup space. The
nearest-code search goes through the rows in chunks, so a large K never needs an (m, k) matrix over
the whole batch.
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
    """(m, d), (k, d) -> (m, k) squared Euclidean distances, always in fp32: the paper's step as a whole
    matrix. `nearest_codes` searches with `distance_scores` (the same less |z|^2) in bounded chunks.

    Expanded as |z|^2 - 2 z.e + |e|^2: one matmul instead of an (m, k, d) difference.
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        z, codebook = z.float(), codebook.float()
        return distance_scores(z, codebook, codebook.pow(2).sum(1)) + z.pow(2).sum(1, keepdim=True)


MAX_DISTANCE_ELEMENTS = 2**24  # the largest (rows, k) block of distances held at once: 64 MiB in fp32


def distance_scores(z: Tensor, codebook: Tensor, codebook_sq: Tensor) -> Tensor:
    """(m, d), (k, d), (k,) |e|^2 -> (m, k) |e|^2 - 2 z.e, in fp32: the squared distance less |z|^2, which
    is the same for every code of a row, so it has the same argmin; one fused matmul."""
    return torch.addmm(codebook_sq, z, codebook.t(), alpha=-2.0)


def nearest_codes(z: Tensor, codebook: Tensor, max_elements: int | None = None) -> Tensor:
    """(m, d), (k, d) -> (m,) index of the nearest codebook row (argmin has no gradient; ties: the lowest).

    Rows go through in chunks of at most `max_elements` (default `MAX_DISTANCE_ELEMENTS`) distances, so
    memory stays bounded for any K and batch; every row gets the same formula whatever its chunk.
    """
    rows = max(1, (max_elements or MAX_DISTANCE_ELEMENTS) // codebook.shape[0])
    with torch.autocast(device_type=z.device.type, enabled=False):
        z, codebook = z.float(), codebook.float()
        codebook_sq = codebook.pow(2).sum(1)  # (k,)
        return torch.cat([distance_scores(part, codebook, codebook_sq).argmin(dim=1) for part in z.split(rows)])


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


def kmeans(x: Tensor, k: int, iters: int, generator: torch.Generator | None = None,
           spherical: bool = False) -> Tensor:
    """(m, d) -> (k, d) centroids by Lloyd's algorithm, seeded with k sampled rows.

    Fewer rows than centroids (m < k): every row seeds one centroid and the other k - m repeat rows;
    a repeat never wins a row (ties go to the lowest index), so it stays unused until restarted.
    spherical: centroids l2-normalised after each update (k-means by cosine, for unit-length x).
    """
    m = x.shape[0]
    if m >= k:
        start = torch.randperm(m, generator=generator, device="cpu")[:k]
    else:
        start = torch.cat([torch.randperm(m, generator=generator, device="cpu"),
                           torch.randint(m, (k - m,), generator=generator, device="cpu")])
    centroids = x[start.to(x.device)].clone()
    for _ in range(iters):
        assign = nearest_codes(x, centroids)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        if spherical:
            centroids = F.normalize(centroids, dim=1)
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
    """Nearest-neighbour quantization with straight-through gradients and a healthy codebook.

    lookup_dim > 0: factorised codes, searched by cosine among K l2-normalised `lookup_dim` vectors
    (see the module's docstring); 0: the paper's quantizer, searched in `code_dim`.
    """

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
        lookup_dim: int = 0,
    ):
        super().__init__()
        self.codebook_size, self.code_dim, self.lookup_dim = codebook_size, code_dim, lookup_dim
        self.beta, self.update = beta, update
        self.ema_decay, self.ema_eps = ema_decay, ema_eps
        self.restart_after = restart_after
        space = lookup_dim or code_dim  # where the codes live and are searched
        init = torch.randn(codebook_size, space) / space**0.5
        if lookup_dim:
            self.proj_in = nn.Linear(code_dim, lookup_dim)
            self.proj_out = nn.Linear(lookup_dim, code_dim)
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
        z_e32 = z_e.float()
        u = self.to_lookup(flatten_vectors(z_e32))  # (m, l), m = b*h*w; l = d without factorisation
        if self.training:
            self._maintain(u.detach())
        codes = self.codes()  # (k, l)
        indices = nearest_codes(u.detach(), codes)  # (m,)
        q = lookup(indices, codes)  # (m, l), fp32
        codebook_loss, commitment_loss = vq_losses(u, q)
        if self.update == "ema":
            codebook_loss = codebook_loss.detach() * 0  # the EMA moves the codes instead
        loss = codebook_loss + self.beta * commitment_loss
        counts = torch.bincount(indices, minlength=self.codebook_size)
        if self.training:
            counts = _all_reduce_sum(counts)
            self._track_usage(counts)
            if self.update == "ema":
                self._ema_step(u.detach(), indices, counts)
        return QuantizerOutput(
            z_q=unflatten_vectors(self.from_lookup(straight_through(u, q)), b, h, w),  # (b, d, h, w)
            indices=rearrange(indices, "(b h w) -> b h w", b=b, h=h, w=w),
            loss=loss,
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
            counts=counts,
        )

    def decode_indices(self, indices: Tensor) -> Tensor:
        """(b, h, w) codes -> (b, d, h, w) codebook vectors (projected up to code_dim when factorised)."""
        b, h, w = indices.shape
        return unflatten_vectors(self.from_lookup(lookup(indices.flatten(), self.codes())), b, h, w)

    # -- the lookup space: z_e's own space, or the factorised one -------------------------

    def to_lookup(self, flat: Tensor) -> Tensor:
        """(m, d) encoder vectors -> (m, l) vectors the codes are searched among (fp32)."""
        if not self.lookup_dim:
            return flat
        with torch.autocast(device_type=flat.device.type, enabled=False):
            return F.normalize(self.proj_in(flat.float()), dim=1)

    def from_lookup(self, v: Tensor) -> Tensor:
        """(m, l) quantized vectors -> (m, d) for the decoder (fp32)."""
        if not self.lookup_dim:
            return v
        with torch.autocast(device_type=v.device.type, enabled=False):
            return self.proj_out(v.float())

    def codes(self) -> Tensor:
        """(k, l) the codes as searched: the codebook, l2-normalised when factorised."""
        return F.normalize(self.codebook, dim=1) if self.lookup_dim else self.codebook

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
                                kmeans(flat, self.codebook_size, 10, spherical=bool(self.lookup_dim)))
                self.initialized.fill_(True)
            self._known_initialized = True
        if self.restart_after > 0:
            dead = self.unused_steps >= self.restart_after  # (k,)
            pick = torch.randint(flat.shape[0], (self.codebook_size,), device=flat.device)
            self._set_codes(dead, flat[pick])
            self.unused_steps.masked_fill_(dead, 0)

    def _set_codes(self, rows: Tensor, vectors: Tensor) -> None:
        """Overwrite the codebook rows where `rows` (k,) is true by `vectors` (k, l) of the main process."""
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
