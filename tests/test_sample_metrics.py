"""Sample-quality measures beyond the FID: KID, precision/recall, density/coverage, nearest neighbours,
memorisation, the spread over seeds, and their place in `vqgen eval --samples`."""

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from vqgen.core.data.shapes import make_shapes
from vqgen.core.evaluate import sample_metrics as sm
from vqgen.core.evaluate import seeds
from vqgen.core.evaluate.quality import (
    JudgeConfig,
    frechet_distance_of,
    memorisation_scores,
    reference_floor,
    reference_of,
    sample_quality,
    train_judge,
)
from vqgen.core.runtime.errors import VQGenError

SIZE = 16


def gaussian(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


# --- references computed here, the textbook way ------------------------------------------------


def numpy_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 under (x.y/d + 1)^3, from whole kernel matrices."""
    d, m, n = x.shape[1], len(x), len(y)
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * kxy.mean())


def exact_mmd2_of_gaussians(mu1, s1, mu2, s2) -> float:
    """MMD^2 of N(mu1, s1) and N(mu2, s2) under (x.y/d + 1)^3 = sum_j C(3, j) <x^(j), y^(j)> / d^j:
    the squared differences of the first three moment tensors, weighted 3/d, 3/d^2, 1/d^3."""
    d = len(mu1)

    def moments(mu, s):
        second = s + np.outer(mu, mu)
        third = (np.einsum("i,j,k->ijk", mu, mu, mu) + np.einsum("i,jk->ijk", mu, s)
                 + np.einsum("j,ik->ijk", mu, s) + np.einsum("k,ij->ijk", mu, s))
        return mu, second, third

    return sum(w * np.sum((a - b) ** 2) for w, a, b in zip((3 / d, 3 / d ** 2, 1 / d ** 3),
                                                             moments(mu1, s1), moments(mu2, s2)))


def brute_knn_radius(x: np.ndarray, k: int) -> np.ndarray:
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, k - 1]


# --- KID -----------------------------------------------------------------------------------


def test_kid_of_two_samples_of_one_distribution_is_near_zero_and_of_two_apart_is_not():
    x, y = gaussian(600, 8, 0), gaussian(500, 8, 1)
    value, se = sm.kid(x, y, subsets=20)
    assert abs(value) < 3 * se and se < 0.05, (value, se)
    far, far_se = sm.kid(x, gaussian(500, 8, 2, shift=0.5), subsets=20)
    assert far > 10 * far_se and far > 20 * abs(value), (far, far_se)


def test_kid_is_unbiased_and_its_std_error_honest_on_gaussians_with_a_known_answer():
    """400 independent small samples (20 each) of two Gaussians: the mean of their KIDs agrees with the exact
    MMD^2 within its standard error; the biased estimate (diagonal kept) does not, so the check has teeth;
    and the std error each call reports is the real spread of its value, not 5-15x less."""
    rng = np.random.default_rng(0)
    d, m, runs = 3, 20, 400
    mu1, mu2 = np.zeros(d), np.array([0.4, -0.2, 0.0])
    a = rng.normal(size=(d, d)) * 0.3
    s1, s2 = np.eye(d), np.eye(d) + a @ a.T
    exact = exact_mmd2_of_gaussians(mu1, s1, mu2, s2)
    values, errors, biased = [], [], []
    for _ in range(runs):
        x, y = rng.multivariate_normal(mu1, s1, size=m), rng.multivariate_normal(mu2, s2, size=m)
        value, se = sm.kid(torch.tensor(x), torch.tensor(y), subsets=1, subset_size=m)
        values.append(value)
        errors.append(se)
        kxx, kyy, kxy = ((p @ q.T / d + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    values = np.array(values)
    standard_error = values.std(ddof=1) / math.sqrt(runs)
    print(f"\nexact {exact:.5f}, mean KID {values.mean():.5f} +- {standard_error:.5f}, biased {np.mean(biased):.5f}")
    assert abs(values.mean() - exact) < 3 * standard_error
    assert abs(np.mean(biased) - exact) > 6 * standard_error
    assert 0.8 < np.mean(errors) / values.std(ddof=1) < 2.0, (np.mean(errors), values.std(ddof=1))


def test_exact_mmd2_formula_against_a_large_monte_carlo():
    """The analytic answer above, checked by brute force in float64: the linear-time estimate over 10^6
    independent pairs, mean of k(x, x') + k(y, y') - k(x, y') - k(x', y), within 4 of its standard errors."""
    rng = np.random.default_rng(1)
    d, n = 2, 1_000_000
    mu1, mu2, s1, s2 = np.zeros(d), np.array([0.5, 0.0]), np.eye(d), np.diag([1.5, 0.7])
    x, x2 = rng.multivariate_normal(mu1, s1, size=(2, n))
    y, y2 = rng.multivariate_normal(mu2, s2, size=(2, n))

    def k(a, b):
        return (np.einsum("nd,nd->n", a, b) / d + 1) ** 3

    h = k(x, x2) + k(y, y2) - k(x, y2) - k(x2, y)
    exact = exact_mmd2_of_gaussians(mu1, s1, mu2, s2)
    assert abs(h.mean() - exact) < 4 * h.std() / math.sqrt(n), (h.mean(), exact, h.std() / math.sqrt(n))
    assert exact > 20 * h.std() / math.sqrt(n)  # and the answer is far from 0 at this precision


def test_kid_and_fid_match_numpy_and_scipy_on_fixed_features(monkeypatch):
    rng = np.random.default_rng(2)
    fa, fb = rng.normal(size=(60, 5)), rng.normal(loc=0.3, size=(45, 5)) * 1.2
    # FID: the textbook formula with scipy's general matrix square root
    ma, mb, sa, sb = fa.mean(0), fb.mean(0), np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    fid = np.sum((ma - mb) ** 2) + np.trace(sa + sb - 2 * scipy.linalg.sqrtm(sa @ sb).real)
    assert frechet_distance_of(fa, fb) == pytest.approx(fid, rel=1e-8)
    # KID: whole sets of equal size are one subset, in any order
    assert sm.kid(torch.tensor(fa[:45]), torch.tensor(fb), subsets=3)[0] == pytest.approx(
        numpy_mmd2(fa[:45], fb), rel=1e-10)
    # subsets: randperm of the real then the fake set, from one generator seeded by `seed`
    g = torch.Generator().manual_seed(7)
    expected = []
    for _ in range(5):
        ix, iy = torch.randperm(60, generator=g)[:30].numpy(), torch.randperm(45, generator=g)[:30].numpy()
        expected.append(numpy_mmd2(fa[ix], fb[iy]))
    assert sm.kid(torch.tensor(fa), torch.tensor(fb), subsets=5, subset_size=30, seed=7)[0] == pytest.approx(
        np.mean(expected), rel=1e-10)
    # the kernel sums in blocks of a few entries give the same
    small = sm.kid(torch.tensor(fa), torch.tensor(fb), subsets=5, subset_size=30, seed=7)
    monkeypatch.setattr(sm, "BLOCK", 300)
    assert sm.kid(torch.tensor(fa), torch.tensor(fb), subsets=5, subset_size=30, seed=7) == pytest.approx(small)


def test_kid_default_subsets_are_capped_by_the_smaller_set_and_reproduce_per_seed():
    x, y = gaussian(300, 4, 0), gaussian(120, 4, 1, shift=0.1)
    a = sm.kid(x, y, subsets=20, seed=3)
    assert a == sm.kid(x, y, subsets=20, seed=3)  # exactly
    assert a != sm.kid(x, y, subsets=20, seed=4)
    assert a[0] == pytest.approx(sm.kid(x, y, subsets=20, subset_size=120, seed=3)[0], rel=1e-12)


# --- nearest neighbours and the k-NN measures -----------------------------------------------


@pytest.mark.parametrize("block", [sm.BLOCK, 256 * 3])
def test_nearest_matches_brute_force_in_blocks(monkeypatch, block):
    monkeypatch.setattr(sm, "BLOCK", block)
    q, r = gaussian(70, 6, 0), gaussian(90, 6, 1)
    d, i = sm.nearest(q, r)
    full = torch.cdist(q, r)
    assert torch.equal(i, full.argmin(1)) and torch.allclose(d, full.min(1).values, rtol=1e-10)
    r[5] = r[17]  # a duplicate is a neighbour; only the item itself is excluded
    d, i = sm.nearest(r, r, exclude_self=True)
    full = torch.cdist(r, r).fill_diagonal_(math.inf)
    assert torch.equal(i[[5, 17]], torch.tensor([17, 5])) and d[5] < 1e-6
    assert torch.allclose(d, full.min(1).values, atol=1e-6)
    assert torch.allclose(sm.knn_radii(r, 3), torch.tensor(brute_knn_radius(r.numpy(), 3)), atol=1e-6)


def numpy_manifold_scores(x: np.ndarray, y: np.ndarray, k_pr: int, k_dc: int) -> dict[str, float]:
    """Precision, recall, density and coverage straight from the papers' definitions."""
    dxy = np.sqrt(((y[:, None] - x[None]) ** 2).sum(-1))  # (fake, real)
    rx, ry, rx_dc = brute_knn_radius(x, k_pr), brute_knn_radius(y, k_pr), brute_knn_radius(x, k_dc)
    return {"precision": np.mean((dxy <= rx[None]).any(1)), "recall": np.mean((dxy.T <= ry[None]).any(1)),
            "density": (dxy <= rx_dc[None]).sum() / (k_dc * len(y)), "coverage": np.mean(dxy.min(0) <= rx_dc)}


@pytest.mark.parametrize("block", [sm.BLOCK, 256 * 5])
def test_precision_recall_density_coverage_match_their_definitions(monkeypatch, block):
    monkeypatch.setattr(sm, "BLOCK", block)
    x, y = gaussian(80, 4, 0), gaussian(60, 4, 1, shift=0.4) * 1.3
    got = {**sm.precision_recall(x, y, k=3), **sm.density_coverage(x, y, k=5)}
    want = numpy_manifold_scores(x.numpy(), y.numpy(), 3, 5)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1 and 0 < got["coverage"] < 1


def test_a_set_against_itself_and_a_collapsed_set():
    x = gaussian(200, 8, 0)
    assert sm.precision_recall(x, x) == {"precision": 1.0, "recall": 1.0}
    assert sm.density_coverage(x, x)["coverage"] == 1.0
    collapsed = x[:1].repeat(150, 1) + 0.0  # every sample the same (real) image: mode collapse
    pr = sm.precision_recall(x, collapsed)
    assert pr["precision"] == 1.0 and pr["recall"] <= 1 / 200, pr
    assert sm.density_coverage(x, collapsed)["coverage"] <= 5 / 200
    fresh = gaussian(200, 8, 1)
    assert sm.precision_recall(x, fresh)["recall"] > 0.6 and sm.density_coverage(x, fresh)["coverage"] > 0.6


# --- memorisation ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes():
    return {name: make_shapes(n, seed, size=SIZE)[:2] for name, n, seed in
            (("train", 400, 1), ("test", 240, 2), ("fresh", 400, 3))}


@pytest.fixture(scope="module")
def judge(shapes):
    x, y = shapes["train"]
    return train_judge(x, y, JudgeConfig.for_data(x, y, width=8, steps=60, batch_size=32, learning_rate=3e-3,
                                                  seed=5))


def decoded_like(images: torch.Tensor) -> torch.Tensor:
    """Images blurred the way a VQ-VAE's reconstruction softens them (half blurred at 2x, ~30 dB)."""
    x = images.float()
    blurred = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)
    return (0.5 * x + 0.5 * blurred).round().clamp(0, 255).to(torch.uint8)


def test_a_sampler_returning_training_images_is_all_near_copies_and_new_images_about_the_quantile(judge, shapes):
    (x, _), (xt, _), (xf, _) = shapes["train"], shapes["test"], shapes["fresh"]
    (copies, found), (new, _), (blurred, _) = memorisation_scores(judge, [x[:100], xf, decoded_like(x[:100])],
                                                                   x, xt, seed=0)
    assert copies["near_copies"] == 1.0 and copies["near_copies_pixels"] == 1.0, copies
    assert torch.equal(found["pixels"].nearest_index, torch.arange(100))
    assert float(found["pixels"].distance.max()) < 1e-5
    print(f"\ncopies {copies}\nnew {new}")
    # 120 test images set the threshold and 120 check it: their shares scatter by ~0.04 around 0.05 (0 to
    # 0.17 over seeds 0-5), and new images follow the held-out half, the thing to compare them with
    for suffix in ("", "_pixels"):
        share, heldout = new[f"near_copies{suffix}"], new[f"near_copies_heldout{suffix}"]
        assert share < 0.2 and heldout < 0.2 and abs(share - heldout) < 0.1, (suffix, share, heldout)
        assert new[f"near_copy_threshold{suffix}"] == copies[f"near_copy_threshold{suffix}"] > 0
    assert blurred["near_copies_pixels"] > 0.8, blurred  # copies through a decoder are still caught in pixels


@pytest.mark.parametrize("relative", [True, False])
def test_memorisation_on_features_with_duplicates_and_seeds(relative):
    train = gaussian(300, 6, 0)
    train[10] = train[11]  # an exact duplicate in the training set: one image, its spacing is to a third
    held, samples = gaussian(200, 6, 1), torch.cat([train[[10, 11, 12]], gaussian(97, 6, 2)])
    a = sm.memorisation(samples, train, held, relative=relative, seed=3)
    assert torch.equal(a.score[:3] <= a.threshold, torch.tensor([True, True, True]))
    assert a.share == pytest.approx((3 + float((a.score[3:] <= a.threshold).sum())) / 100)
    assert a.share < 0.2 and abs(a.heldout_share - 0.05) < 0.08 and a.quantile == 0.05
    b = sm.memorisation(samples, train, held, relative=relative, seed=3)
    assert (a.threshold, a.share, a.heldout_share) == (b.threshold, b.share, b.heldout_share)
    assert torch.equal(a.score, b.score) and torch.equal(a.nearest_index, b.nearest_index)
    c = sm.memorisation(samples, train, held, relative=relative, seed=4)  # another calibration half
    assert c.threshold != a.threshold and torch.equal(c.score, a.score)
    assert a.heldout_duplicates == 0.0
    if relative:
        spacing = torch.cdist(train, train).fill_diagonal_(math.inf)
        spacing[10, 11] = spacing[11, 10] = math.inf
        nn = a.nearest_index[5]
        assert a.score[5] == pytest.approx(float(a.distance[5] / spacing[nn].min()), rel=1e-9)
    else:
        assert torch.equal(a.score, a.distance)


def test_heldout_items_equal_to_training_items_are_leaks_left_out_of_the_calibration():
    """As OpenMoji's 9 of 243 test images: were they calibration, a 5 % quantile of 0 would let rounding
    decide whether an exact copy is one."""
    train, held = gaussian(300, 6, 0), gaussian(200, 6, 1)
    held[:20] = train[:20] * 1.0  # 10 % of the held-out items are training items
    samples = train[50:90]
    found = sm.memorisation(samples, train, held, quantile=0.05, seed=0)
    assert found.heldout_duplicates == pytest.approx(0.1) and found.threshold > 0
    assert found.share == 1.0 and float(found.distance.max()) == 0.0  # exactly 0, not rounding
    with pytest.raises(VQGenError, match="at least 4 held-out items unequal to every training item, got 3 of 8"):
        sm.memorisation(samples, train, torch.cat([train[:5], held[100:103]]))


def test_closest_pairs_grid_puts_each_sample_beside_its_training_image(shapes):
    (x, _), (xf, _) = shapes["train"], shapes["fresh"]
    samples = torch.cat([xf[:6], x[[7]], xf[6:9]])  # sample 6 is training image 7
    found = sm.memorisation(sm.pixels(samples), sm.pixels(x), sm.pixels(shapes["test"][0]))
    picture = sm.closest_pairs_grid(samples, x, found, k=4, pairs_per_row=2)
    pad, cell = 2, SIZE + 2
    assert picture.dtype == torch.uint8 and picture.shape == (3, pad + 2 * cell, pad + 4 * cell)
    assert torch.equal(picture[:, pad:pad + SIZE, pad:pad + SIZE], x[7])  # first: the copy ...
    assert torch.equal(picture[:, pad:pad + SIZE, pad + cell:pad + cell + SIZE], x[7])  # ... beside the original
    second = found.closest(2)[1]
    assert torch.equal(picture[:, pad:pad + SIZE, pad + 2 * cell:pad + 2 * cell + SIZE], samples[second])
    assert torch.equal(picture[:, pad:pad + SIZE, pad + 3 * cell:pad + 3 * cell + SIZE],
                       x[found.nearest_index[second]])
    assert sm.closest_pairs_grid(samples, x, found, k=50).shape[2] == pad + 8 * cell  # k capped at n


# --- seeds ---------------------------------------------------------------------------------


def test_t975_table_is_scipys_and_rounds_down():
    for df in [*range(1, 31), 40, 60, 120]:
        assert seeds.t975(df) == pytest.approx(scipy.stats.t.ppf(0.975, df), abs=1e-5)
    assert seeds.t975(math.inf) == pytest.approx(scipy.stats.norm.ppf(0.975), abs=1e-5)
    assert seeds.t975(2.7) == seeds.t975(2) and seeds.t975(45.0) == seeds.t975(40)
    assert seeds.t975(1e6) == seeds.t975(120)


def test_aggregate_seeds_and_compare_settings():
    rng = np.random.default_rng(0)
    fids_a, fids_b = [1.0, 1.2, 0.9], [2.0, 2.3, 2.1]
    runs_a = [{"samples": {"fid": f, "kid": float(k), "n_samples": 100.0}, "seed": s, "note": "x"}
              for s, (f, k) in enumerate(zip(fids_a, rng.normal(size=3)))]
    runs_b = [{"samples": {"fid": f, "kid": float(k), "n_samples": 100.0}, "seed": s}
              for s, (f, k) in enumerate(zip(fids_b, rng.normal(size=3)))]
    a, b = seeds.aggregate_seeds(runs_a), seeds.aggregate_seeds(runs_b)
    assert a["samples"]["fid"]["mean"] == pytest.approx(np.mean(fids_a))
    assert a["samples"]["fid"]["std"] == pytest.approx(np.std(fids_a, ddof=1)) and a["samples"]["fid"]["n"] == 3
    assert a["samples"]["n_samples"] == {"mean": 100.0, "std": 0.0, "n": 3} and "note" not in a
    diff = seeds.compare_settings(a, b)
    welch = scipy.stats.ttest_ind(fids_b, fids_a, equal_var=False)
    assert diff["samples"]["fid"]["difference"] == pytest.approx(np.mean(fids_b) - np.mean(fids_a))
    assert diff["samples"]["fid"]["exceeds"] is True and welch.pvalue < 0.05
    kid_a, kid_b = [r["samples"]["kid"] for r in runs_a], [r["samples"]["kid"] for r in runs_b]
    assert diff["samples"]["kid"]["exceeds"] == (scipy.stats.ttest_ind(kid_b, kid_a, equal_var=False).pvalue < 0.05)
    assert diff["samples"]["n_samples"] == {"difference": 0.0, "spread": 0.0, "exceeds": False}
    one = seeds.aggregate_seeds(runs_a[:1])
    assert one["samples"]["fid"] == {"mean": 1.0, "std": None, "n": 1}
    assert seeds.compare_settings(one, b)["samples"]["fid"]["exceeds"] is None


def test_compare_paired_is_scipys_paired_t_test():
    """Two settings drawn with the same seeds share each seed's luck: the per-seed differences are steady
    though each side scatters, so the paired test sees what Welch's cannot."""
    luck = [0.0, 0.5, -0.4, 0.9]
    a = [{"samples": {"fid": 1.0 + u}, "seed": s} for s, u in enumerate(luck)]
    b = [{"samples": {"fid": 1.1 + u + 0.01 * (-1) ** s}, "seed": s} for s, u in enumerate(luck)]
    got = seeds.compare_paired(a, b)["samples"]["fid"]
    fa, fb = [r["samples"]["fid"] for r in a], [r["samples"]["fid"] for r in b]
    assert got["difference"] == pytest.approx(0.1)
    assert got["exceeds"] is True and scipy.stats.ttest_rel(fb, fa).pvalue < 0.05
    sd = np.std(np.subtract(fb, fa), ddof=1)
    assert got["spread"] == pytest.approx(scipy.stats.t.ppf(0.975, 3) * sd / 2, rel=1e-6)
    welch = seeds.compare_settings(seeds.aggregate_seeds(a), seeds.aggregate_seeds(b))
    assert welch["samples"]["fid"]["exceeds"] is False
    assert seeds.compare_paired(a, a)["seed"] == {"difference": 0.0, "spread": 0.0, "exceeds": False}
    assert seeds.compare_paired(a[:1], b[:1])["samples"]["fid"]["exceeds"] is None
    with pytest.raises(VQGenError, match="same seeds on both sides, got 4 and 3 runs"):
        seeds.compare_paired(a, b[:3])


def test_welch_spread_matches_scipy_at_integer_degrees_of_freedom():
    """Equal n and std on both sides: df = 2 (n - 1) exactly, so the spread is scipy's interval."""
    a = {"mean": 0.0, "std": 1.0, "n": 4}
    b = {"mean": 3.0, "std": 1.0, "n": 4}
    got = seeds.compare_settings({"x": a}, {"x": b})["x"]
    assert got["spread"] == pytest.approx(scipy.stats.t.ppf(0.975, 6) * math.sqrt(0.5), rel=1e-6)
    assert got["exceeds"] is True
    assert seeds.compare_settings({"x": a}, {"x": {**b, "mean": 1.0}})["x"]["exceeds"] is False


# --- in the judge's evaluation -----------------------------------------------------------------


def test_sample_quality_reports_kid_and_the_manifold_scores_beside_the_floor(judge, shapes):
    (x, y), (xt, yt), (xf, yf) = shapes["train"], shapes["test"], shapes["fresh"]
    reference = reference_of(judge, xt, yt)
    real = sample_quality(judge, xf[:200], yf[:200], reference)
    floor = reference_floor(judge, x, reference, n=200, seed=0, train_labels=y)
    noise = torch.randint(0, 256, (200, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    bad = sample_quality(judge, noise, None, reference)
    print(f"\nreal {real}\nfloor {floor}\nnoise {bad}")
    for scores in (real, floor, bad):
        assert {"kid", "kid_std_error", "precision", "recall", "density", "coverage_nn"} <= set(scores)
    assert abs(real["kid"]) < 3 * real["kid_std_error"] + 0.01
    assert bad["kid"] > 5 * bad["kid_std_error"] and bad["kid"] > 20 * max(abs(real["kid"]), abs(floor["kid"]))
    # a small judge maps some noise near outlying test images, whose wide balls let it in (0.55): precision
    # is the blunt one (Naeem et al.'s point), density and coverage_nn the sharp ones
    assert real["precision"] > 0.8 and real["recall"] > 0.8 and bad["precision"] < real["precision"] - 0.3
    assert bad["density"] < 0.5 * real["density"] and bad["coverage_nn"] < 0.5 * real["coverage_nn"]
    few = sample_quality(judge, xf[:4], yf[:4], reference)  # 4 samples: precision/recall (k=3), no density (k=5)
    assert "recall" in few and "density" not in few and "kid" in few


def test_eval_writes_the_new_scores_and_the_closest_pairs(tiny_run, tmp_path):
    from vqgen.run import Run

    run = Run.load(tiny_run)
    out = tmp_path / "pairs.png"
    scores = run.sample_quality(Accelerator(cpu=True), 12, judge_steps=5, closest_pairs=out)
    for key in ("kid", "precision", "coverage_nn", "near_copies", "near_copies_pixels", "near_copies_heldout",
                "near_copy_threshold_pixels"):
        assert key in scores["samples"], key
    assert "near_copies_pixels" in scores["reconstructed"] and "near_copies" not in scores["real"]
    assert "kid" in scores["real"] and "kid" in scores["reconstructed"]
    assert out.is_file()


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("call, message", [
    (lambda: sm.kid(gaussian(1, 3, 0), gaussian(5, 3, 1)), "real features need at least 2 item"),
    (lambda: sm.kid(gaussian(5, 3, 0), gaussian(0, 3, 1)), "fake features need at least 2 item.*got 0"),
    (lambda: sm.kid(gaussian(40, 3, 0), gaussian(30, 3, 1), subset_size=50), "subset_size 50 is more than"),
    (lambda: sm.kid(gaussian(40, 3, 0), gaussian(30, 3, 1), subset_size=1), "subset_size must be .*got 1"),
    (lambda: sm.kid(gaussian(40, 3, 0), gaussian(30, 3, 1), subsets=0), "subsets must be .*got 0"),
    (lambda: sm.kid(gaussian(40, 3, 0), gaussian(30, 4, 1)), "dimensions differ, 3 and 4"),
    (lambda: sm.precision_recall(gaussian(10, 3, 0), gaussian(30, 3, 1), k=10), "k = 10 .* real features, got 10"),
    (lambda: sm.precision_recall(gaussian(30, 3, 0), gaussian(3, 3, 1)), "k = 3 .* fake features, got 3"),
    (lambda: sm.density_coverage(gaussian(5, 3, 0), gaussian(30, 3, 1)), "k = 5 .* real features, got 5"),
    (lambda: sm.density_coverage(gaussian(30, 3, 0), gaussian(30, 3, 1), k=0), "k must be .*got 0"),
    (lambda: sm.nearest(gaussian(0, 3, 0), gaussian(5, 3, 1)), "queries need at least 1 item.*got 0"),
    (lambda: sm.nearest(gaussian(4, 3, 0), gaussian(0, 3, 1)), "references need at least 1 item.*got 0"),
    (lambda: sm.nearest(gaussian(4, 3, 0), gaussian(5, 3, 1), exclude_self=True), "got 4 and 5"),
    (lambda: sm.nearest(torch.zeros(4, 3, 2), gaussian(5, 3, 1)), r"\(n, d\), got shape \(4, 3, 2\)"),
    (lambda: sm.memorisation(gaussian(4, 3, 0), gaussian(9, 3, 1), gaussian(3, 3, 2)),
     "held-out features need at least 4 item.*got 3"),
    (lambda: sm.memorisation(gaussian(4, 3, 0), gaussian(9, 3, 1), gaussian(8, 3, 2), quantile=1.5),
     "quantile must be in .*1.5"),
    (lambda: sm.kid(torch.full((4, 2), math.nan), gaussian(4, 2, 0)), "NaN"),
    (lambda: seeds.aggregate_seeds([]), "got none"),
    (lambda: sm.pixels(torch.zeros(2, 3, 4, 4)), "uint8"),
])
def test_bad_input_is_refused_in_one_line_naming_the_value(call, message):
    with pytest.raises(VQGenError, match=message) as err:
        call()
    assert "\n" not in str(err.value)
