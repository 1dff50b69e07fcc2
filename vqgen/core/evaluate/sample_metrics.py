"""Sample-quality measures beyond the FID, as pure functions on feature tensors (n, d).

`kid` (Binkowski et al. 2018), `precision_recall` (Kynkäänniemi et al. 2019), `density_coverage` (Naeem
et al. 2020), `nearest` neighbours in L2, `memorisation` (the share of samples that are near-copies of a
training image, in two steps: `copy_threshold` learnt once, `near_copies` per sample set), and
`closest_pairs_grid` (the nearest (sample, training image) pairs as one picture); the spread over seeds
is in vqgen.core.evaluate.seeds. Distances and kernels are computed in float64,
in blocks of at most BLOCK entries, so 50k x 50k stays within ~100 MB.

Decisions, measured where a number is given:
- KID's std error is the sampling error of the value over fresh data, not the spread of the subsets: the
  subset mean approximates the U-statistic of all the items, whose variance is, to first order, 4 Var(h_x)
  Σw_x² + 4 Var(h_y) Σw_y² (h: each item's mean kernel to its own set minus to the other, from the
  subsets it fell in; w: how often it was drawn, normalised), plus the subsets' own Monte Carlo error s²/S.
  Simulated (d = 32, 40 datasets per case, 243 or 2,000 real vs 1,000 fake) it is within 0.9-1.5x the
  true spread of KID, never below; the subsets' std over sqrt(S) was 5-15x too small, and their plain
  std (torch-fidelity's kid_std) is 0 when both sets have subset_size items (OpenMoji's 243 test images).
- Memorisation scores a sample by a *relative* distance: its L2 distance to the nearest training item t,
  divided by the distance from t to the nearest training item unequal to t (exact duplicates count as
  one item). An absolute threshold learnt on held-out images is set by the densest regions of the data
  (near-duplicates, where a new image always lies close to a training one), so it misses a copy of an
  isolated image that the decoder softened; the spacing puts dense and sparse regions on one scale.
  Measured with training images blurred like a reconstruction (share flagged, relative vs absolute, at
  the same ~5 % held-out rate; 500 copies, 4 calibration seeds), in pixels: MNIST at 24 dB 0.96 vs 0.43,
  at 18 dB 0.56 vs 0.00; OpenMoji 32 px at 24 dB 0.67 vs 0.09; the shapes at 26 dB 0.99 vs 1.00. In the
  judge's features both catch exact copies (1.00) but few softened ones (relative 0.06-0.22 at 24-32 dB,
  absolute 0.00-0.19): the pixel-space share is the one that sees copies through a decoder.
- The threshold is the `quantile` (default 0.05) of the scores of a seeded random half of the held-out
  items (torch.quantile, linear interpolation); a sample is a near-copy when its score is <= it. So about
  5 % of genuinely new images count as near-copies by construction: read the samples' share beside the
  other half's (`heldout_share`), not beside 0. With OpenMoji's 243 test images (~117 a half) that share
  scatters by ~0.04 over calibration seeds; on MNIST (1,000 a half) by ~0.01.
- Held-out items equal to a training item are leaks, not new images: left out of both halves and counted
  (`heldout_duplicates`). OpenMoji has 9 of 243 test images identical to a training image (3.7 %); kept,
  they made the 5 % quantile 0 and exact copies depend on rounding. Distances under 1e-12 of the squared
  norms are rounding and set to exactly 0.
- Coverage and recall grow with the number of samples against a fixed reference: 243 real shapes score
  coverage 0.45 against the 2,000 test images, 1,000 score 0.88. Compare them at the same n (the eval's
  "real" and "reconstructed" rows), never across sample counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store.imageio import grid

BLOCK = 1 << 22  # entries of one float64 distance or kernel block (32 MiB)
_IDENTICAL = 1e-12  # squared distances below this share of |a|^2 + |b|^2 are rounding: the items are equal


# --- inputs and blocks -----------------------------------------------------------------


def _features(x: Tensor, what: str, min_items: int = 1) -> Tensor:
    """A 2-D, finite float tensor with at least min_items rows (kept in its dtype and device)."""
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if x.ndim != 2:
        raise VQGenError(f"{what} must be a 2-D tensor (n, d), got shape {tuple(x.shape)}")
    if len(x) < min_items:
        raise VQGenError(f"{what} need at least {min_items} item(s), got {len(x)}")
    if not x.is_floating_point():
        x = x.double()
    if not torch.isfinite(x).all():
        raise VQGenError(f"{what} hold NaN or infinite values")
    return x


def _same_width(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise VQGenError(f"{what}: feature dimensions differ, {a.shape[1]} and {b.shape[1]}")


def _blocks(n_rows: int, n_cols: int) -> tuple[int, int]:
    cols = min(max(n_cols, 1), BLOCK // 256)
    return max(1, min(n_rows, BLOCK // cols)), cols


def _squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """(m, d), (n, d) -> float64 squared L2 distances (m, n); equal items (up to rounding) exactly 0."""
    a, b = a.double(), b.double()
    scale = a.square().sum(1)[:, None] + b.square().sum(1)[None, :]
    d = scale - 2 * a @ b.T
    return d.masked_fill_(d <= _IDENTICAL * scale, 0.0)


def _smallest(queries: Tensor, references: Tensor, k: int, skip_self: bool = False,
              skip_identical: bool = False) -> tuple[Tensor, Tensor]:
    """The k smallest squared distances (m, k), ascending, and their reference indices (m, k).

    skip_self: queries are the references, row i skips column i; skip_identical: skip references equal
    to the query (up to rounding). Fewer than k candidates leave inf and index -1."""
    m, n = len(queries), len(references)
    rows, cols = _blocks(m, n)
    out_d = torch.empty(m, k, dtype=torch.float64, device=queries.device)
    out_i = torch.empty(m, k, dtype=torch.int64, device=queries.device)
    for r0 in range(0, m, rows):
        q = queries[r0:r0 + rows]
        best_d = torch.full((len(q), k), math.inf, dtype=torch.float64, device=queries.device)
        best_i = torch.full((len(q), k), -1, dtype=torch.int64, device=queries.device)
        for c0 in range(0, n, cols):
            d = _squared_distances(q, references[c0:c0 + cols])  # (rows, cols)
            if skip_identical:
                d = d.masked_fill(d == 0, math.inf)
            if skip_self:
                r = torch.arange(r0, r0 + len(q), device=d.device)[:, None]
                d = d.masked_fill(r == torch.arange(c0, c0 + d.shape[1], device=d.device)[None, :], math.inf)
            take = min(k, d.shape[1])
            d, i = d.topk(take, dim=1, largest=False)
            both_d, both_i = torch.cat([best_d, d], 1), torch.cat([best_i, i + c0], 1)
            best_d, pick = both_d.topk(k, dim=1, largest=False)
            best_i = both_i.gather(1, pick)
        out_d[r0:r0 + rows], out_i[r0:r0 + rows] = best_d, best_i.masked_fill(best_d.isinf(), -1)
    return out_d, out_i


def _within(queries: Tensor, references: Tensor, radii: Tensor) -> Tensor:
    """(m,) int64: for each query, how many references j lie within radii[j] of it (distance <= radius)."""
    m, n = len(queries), len(references)
    rows, cols = _blocks(m, n)
    r2 = radii.double().square().to(queries.device)
    counts = torch.zeros(m, dtype=torch.int64, device=queries.device)
    for r0 in range(0, m, rows):
        for c0 in range(0, n, cols):
            d = _squared_distances(queries[r0:r0 + rows], references[c0:c0 + cols])
            counts[r0:r0 + rows] += (d <= r2[None, c0:c0 + cols]).sum(1)
    return counts


# --- nearest neighbours ------------------------------------------------------------------


def nearest(queries: Tensor, references: Tensor, exclude_self: bool = False) -> tuple[Tensor, Tensor]:
    """(m, d), (n, d) -> L2 distance (m,) float64 to each query's nearest reference, and its index (m,).

    exclude_self: the queries are the references; item i is not its own neighbour (a duplicate still is)."""
    q = _features(queries, "queries")
    r = _features(references, "references", 2 if exclude_self else 1)
    _same_width(q, r, "nearest")
    if exclude_self and (len(q) != len(r)):
        raise VQGenError(f"nearest with exclude_self needs the queries to be the references, got {len(q)} "
                         f"and {len(r)} items")
    d, i = _smallest(q, r, 1, skip_self=exclude_self)
    return d[:, 0].sqrt(), i[:, 0]


def pixels(images: Tensor) -> Tensor:
    """uint8 (n, c, h, w) -> (n, c*h*w) float32 in [0, 1]: images as points for `nearest`."""
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        got = f"dtype {images.dtype}, shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images)
        raise VQGenError(f"images must be a uint8 tensor (n, c, h, w), got {got}")
    return rearrange(images, "n c h w -> n (c h w)").float() / 255


def knn_radii(features: Tensor, k: int) -> Tensor:
    """(n, d) -> (n,) float64: each item's distance to its k-th nearest other item."""
    x = _features(features, "features")
    _check_k(k, len(x), "features")
    return _smallest(x, x, k, skip_self=True)[0][:, k - 1].sqrt()


def _check_k(k: int, n: int, what: str) -> None:
    if not isinstance(k, int) or k < 1:
        raise VQGenError(f"k must be an integer >= 1, got {k!r}")
    if k >= n:
        raise VQGenError(f"k = {k} needs more than {k} {what}, got {n}")


# --- KID -----------------------------------------------------------------------------------


def _kernel_sums(a: Tensor, b: Tensor, columns: bool = True) -> tuple[Tensor, Tensor | None]:
    """Row sums (m,) and column sums (n,) (None unless `columns`) of the cubic kernel (a.b/d + 1)^3 of
    (m, d), (n, d), blockwise."""
    d = a.shape[1]
    rows, cols = _blocks(len(a), len(b))
    one = torch.ones(1, 1, dtype=torch.float64, device=a.device)
    row_sums = torch.zeros(len(a), dtype=torch.float64, device=a.device)
    col_sums = torch.zeros(len(b), dtype=torch.float64, device=a.device) if columns else None
    for r0 in range(0, len(a), rows):
        for c0 in range(0, len(b), cols):
            g = torch.addmm(one, a[r0:r0 + rows].double(), b[c0:c0 + cols].double().T, alpha=1 / d)
            k = g.square().mul_(g)  # (rows, cols): a product, not pow, which is slower on a CPU
            row_sums[r0:r0 + rows] += k.sum(1)
            if columns:
                col_sums[c0:c0 + cols] += k.sum(0)
    return row_sums, col_sums


def _mmd2(x: Tensor, y: Tensor) -> tuple[float, Tensor, Tensor]:
    """Unbiased MMD^2 of two (m, d) sets under the cubic kernel, and each item's projection h (m,), (m,):
    its mean kernel to the other items of its own set minus its mean kernel to the other set."""
    m, n, d = len(x), len(y), x.shape[1]
    kxx, _ = _kernel_sums(x, x, columns=False)  # symmetric: the columns' sums are the rows'
    kyy, _ = _kernel_sums(y, y, columns=False)
    kxy_rows, kxy_cols = _kernel_sums(x, y)
    kxx = kxx - (x.double().square().sum(1) / d + 1) ** 3  # off the diagonal
    kyy = kyy - (y.double().square().sum(1) / d + 1) ** 3
    value = kxx.sum() / (m * (m - 1)) + kyy.sum() / (n * (n - 1)) - 2 * kxy_rows.sum() / (m * n)
    return float(value), kxx / (m - 1) - kxy_rows / n, kyy / (n - 1) - kxy_cols / m


def _projection_variance(h: Tensor, counts: Tensor) -> float:
    """Var of the count-weighted mean of per-item projections: Var(h) Σ w², w = counts / Σ counts."""
    used = counts > 0
    mean_h = h[used] / counts[used]
    w = counts[used] / counts.sum()
    return float(mean_h.var() * w.square().sum()) if used.sum() > 1 else 0.0


def kid(real_features: Tensor, fake_features: Tensor, subsets: int = 100, subset_size: int | None = None,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance in any features: (mean, std error) of the unbiased MMD^2 under the kernel
    (x.y/d + 1)^3 over `subsets` random subsets of subset_size items of each set.

    subset_size None: 1000, capped by the smaller set; a given size must fit both sets. The std error is
    that of the value over fresh data (module docstring)."""
    x = _features(real_features, "real features", 2)
    y = _features(fake_features, "fake features", 2)
    _same_width(x, y, "KID")
    if not isinstance(subsets, int) or subsets < 1:
        raise VQGenError(f"KID subsets must be an integer >= 1, got {subsets!r}")
    if subset_size is None:
        m = min(1000, len(x), len(y))
    elif not isinstance(subset_size, int) or subset_size < 2:
        raise VQGenError(f"KID subset_size must be an integer >= 2, got {subset_size!r}")
    elif subset_size > min(len(x), len(y)):
        raise VQGenError(f"KID subset_size {subset_size} is more than the sets hold: {len(x)} real, "
                         f"{len(y)} fake features")
    else:
        m = subset_size
    g = torch.Generator().manual_seed(seed)
    values = torch.empty(subsets, dtype=torch.float64)
    hx, cx = torch.zeros(len(x), dtype=torch.float64), torch.zeros(len(x), dtype=torch.float64)
    hy, cy = torch.zeros(len(y), dtype=torch.float64), torch.zeros(len(y), dtype=torch.float64)
    ones = torch.ones(m, dtype=torch.float64)
    for s in range(subsets):
        ix, iy = torch.randperm(len(x), generator=g)[:m], torch.randperm(len(y), generator=g)[:m]
        values[s], px, py = _mmd2(x[ix.to(x.device)], y[iy.to(y.device)])
        hx.index_add_(0, ix, px.cpu())
        cx.index_add_(0, ix, ones)
        hy.index_add_(0, iy, py.cpu())
        cy.index_add_(0, iy, ones)
    monte_carlo = float(values.var()) / subsets if subsets > 1 else 0.0
    variance = 4 * (_projection_variance(hx, cx) + _projection_variance(hy, cy)) + monte_carlo
    return float(values.mean()), math.sqrt(variance)


# --- manifolds: precision, recall, density, coverage ------------------------------------------------


def _two_sets(real: Tensor, fake: Tensor, what: str) -> tuple[Tensor, Tensor]:
    x, y = _features(real, "real features"), _features(fake, "fake features")
    _same_width(x, y, what)
    return x, y


def precision_recall(real_features: Tensor, fake_features: Tensor, k: int = 3,
                     real_radii: Tensor | None = None) -> dict[str, float]:
    """Kynkäänniemi et al. 2019: precision = share of fakes inside the real manifold (the union of balls
    around each real item reaching its k-th nearest real neighbour), recall = share of reals inside the
    fake manifold. real_radii: `knn_radii(real, k)`, when already computed."""
    x, y = _two_sets(real_features, fake_features, "precision/recall")
    _check_k(k, len(x), "real features")
    _check_k(k, len(y), "fake features")
    rx = knn_radii(x, k) if real_radii is None else real_radii
    ry = knn_radii(y, k)
    return {"precision": float((_within(y, x, rx) > 0).double().mean()),
            "recall": float((_within(x, y, ry) > 0).double().mean())}


def density_coverage(real_features: Tensor, fake_features: Tensor, k: int = 5,
                     real_radii: Tensor | None = None) -> dict[str, float]:
    """Naeem et al. 2020: density = real balls (k-th neighbour radius) holding each fake, counted and
    divided by k, averaged; coverage = share of real balls holding at least one fake."""
    x, y = _two_sets(real_features, fake_features, "density/coverage")
    _check_k(k, len(x), "real features")
    rx = knn_radii(x, k) if real_radii is None else real_radii
    nearest_fake, _ = nearest(x, y)
    return {"density": float(_within(y, x, rx).double().sum() / (k * len(y))),
            "coverage": float((nearest_fake <= rx).double().mean())}


# --- memorisation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CopyThreshold:
    """What counts as a near-copy of a training set, learnt on held-out items (`copy_threshold`)."""

    threshold: float      # on the score: a sample with score <= threshold is a near-copy
    quantile: float       # of the calibration half's scores that set the threshold
    heldout_share: float  # of the other held-out half at or under it: what new images give (~ quantile)
    heldout_duplicates: float  # of the held-out items equal to a training item: left out of both halves
    relative: bool        # the score is the distance over the training item's own spacing


@dataclass(frozen=True)
class Memorisation(CopyThreshold):
    """Near-copies of training images among n samples, with the threshold they were judged by."""

    share: float           # of the samples that are near-copies
    nearest_index: Tensor  # (n,) int64: each sample's nearest training item
    distance: Tensor       # (n,) float64: the L2 distance to it
    score: Tensor          # (n,) float64: what the threshold applies to

    def closest(self, k: int) -> Tensor:
        """Indices (min(k, n),) of the samples with the lowest scores, lowest first."""
        return self.score.argsort(stable=True)[:k]

    def scores(self, suffix: str = "") -> dict[str, float]:
        """The numbers for a report: near_copies, near_copies_heldout, near_copy_threshold (+ suffix)."""
        return {f"near_copies{suffix}": self.share, f"near_copies_heldout{suffix}": self.heldout_share,
                f"near_copy_threshold{suffix}": self.threshold}


def _copy_scores(queries: Tensor, train: Tensor, relative: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(m, d) queries against (N, d) training items -> the distance (m,) to the nearest, its index (m,), and
    the score (m,): the distance, or over that item's distance to its nearest unequal training item."""
    distance, index = nearest(queries.to(train.device, train.dtype), train)
    if not relative:
        return distance, index, distance
    used, where = index.unique(return_inverse=True)
    spacing = _smallest(train[used], train, 1, skip_identical=True)[0][:, 0].sqrt()[where]
    # a training set of identical items has no spacing: then the plain distance
    return distance, index, distance / torch.where(spacing.isfinite() & (spacing > 0), spacing,
                                                   torch.ones_like(spacing))


def copy_threshold(train_features: Tensor, heldout_features: Tensor, quantile: float = 0.05, seed: int = 0,
                   relative: bool = True, max_heldout: int = 2000) -> CopyThreshold:
    """The near-copy threshold of a training set (N, d), from held-out real items (h, d), by definition no
    copies: a seeded half of (at most max_heldout of) those unequal to every training item sets it at its
    `quantile`, the other half measures what new images score (module docstring)."""
    t = _features(train_features, "training features", 2 if relative else 1)
    h = _features(heldout_features, "held-out features", 4)
    _same_width(h, t, "memorisation")
    if not 0 < quantile < 1:
        raise VQGenError(f"memorisation quantile must be in (0, 1), got {quantile!r}")
    if max_heldout < 4:
        raise VQGenError(f"memorisation max_heldout must be >= 4, got {max_heldout!r}")
    order = torch.randperm(len(h), generator=torch.Generator().manual_seed(seed))[:max_heldout].to(h.device)
    distance, _, score = _copy_scores(h[order], t, relative)
    new = distance > 0  # a held-out item equal to a training item is a leak, not a new image
    if int(new.sum()) < 4:
        raise VQGenError(f"memorisation needs at least 4 held-out items unequal to every training item, got "
                         f"{int(new.sum())} of {len(order)}")
    score = score[new].cpu()
    half = len(score) // 2
    threshold = float(torch.quantile(score[:half], quantile))
    return CopyThreshold(threshold=threshold, quantile=quantile,
                         heldout_share=float((score[half:] <= threshold).double().mean()),
                         heldout_duplicates=float((~new).double().mean()), relative=relative)


def near_copies(sample_features: Tensor, train_features: Tensor, threshold: CopyThreshold) -> Memorisation:
    """Which of n samples (n, d) are near-copies of a training item (N, d), by a `copy_threshold` of it."""
    s = _features(sample_features, "sample features")
    t = _features(train_features, "training features", 2 if threshold.relative else 1)
    _same_width(s, t, "memorisation")
    distance, index, score = _copy_scores(s, t, threshold.relative)
    return Memorisation(**vars(threshold), share=float((score <= threshold.threshold).double().mean()),
                        nearest_index=index.cpu(), distance=distance.cpu(), score=score.cpu())


def memorisation(sample_features: Tensor, train_features: Tensor, heldout_features: Tensor,
                 quantile: float = 0.05, seed: int = 0, relative: bool = True,
                 max_heldout: int = 2000) -> Memorisation:
    """`near_copies` of samples (n, d) among training items (N, d) by the `copy_threshold` that held-out
    items (h, d) give; to judge several sample sets by one training set, compute the threshold once."""
    return near_copies(sample_features, train_features, copy_threshold(
        train_features, heldout_features, quantile, seed, relative, max_heldout))


def closest_pairs_grid(samples: Tensor, train_images: Tensor, found: Memorisation, k: int = 8,
                       pairs_per_row: int = 4) -> Tensor:
    """The k samples closest to a training image, each beside that image: uint8 (n, c, h, w) samples and
    (N, c, h, w) training images -> one uint8 (c, H, W) grid, pairs_per_row (sample, training) pairs a row."""
    if samples.dtype != torch.uint8 or train_images.dtype != torch.uint8 or samples.shape[1:] != train_images.shape[1:]:
        raise VQGenError(f"closest pairs need uint8 samples and training images of one shape, got "
                         f"{samples.dtype} {tuple(samples.shape)} and {train_images.dtype} {tuple(train_images.shape)}")
    if len(found.score) != len(samples):
        raise VQGenError(f"closest pairs: {len(samples)} samples but the memorisation scored {len(found.score)}")
    if k < 1 or pairs_per_row < 1:
        raise VQGenError(f"closest pairs: k and pairs_per_row must be >= 1, got {k} and {pairs_per_row}")
    pick = found.closest(k)
    partner = found.nearest_index[pick]
    pairs = torch.stack([samples[pick.to(samples.device)].cpu(),
                         train_images[partner.to(train_images.device)].cpu()], 1)  # (k, 2, c, h, w)
    return grid(rearrange(pairs, "k two c h w -> (k two) c h w"), nrow=2 * pairs_per_row)
