"""The offline quality measures: Fréchet distance, the judge, sample quality, the optional Inception FID."""

import sys
import types

import numpy as np
import pytest
import scipy.linalg
import torch

from vqgen.core.data.shapes import make_shapes
from vqgen.core.evaluate.inception import inception_scores
from vqgen.core.evaluate.quality import (
    Judge,
    JudgeConfig,
    feature_stats,
    frechet_distance,
    frechet_distance_of,
    judge_accuracy,
    judge_features,
    judge_is_reliable,
    load_judge,
    reference_floor,
    reference_of,
    sample_quality,
    save_judge,
    train_judge,
)
from vqgen.core.runtime.errors import VQGenError

SIZE = 16
TINY = dict(width=16, steps=120, batch_size=32, learning_rate=3e-3, seed=5)


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    """The textbook formula, with scipy's general matrix square root."""
    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root.real))


def random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def noise(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def shapes():
    """Train, test and a third draw of real shapes (the 'perfect samples')."""
    return {name: make_shapes(n, seed, size=SIZE)[:2]
            for name, n, seed in (("train", 600, 1), ("test", 300, 2), ("fresh", 300, 3))}


@pytest.fixture(scope="module")
def judge(shapes):
    x, y = shapes["train"]
    config = JudgeConfig.for_data(x, y, **TINY)
    assert (config.task, config.num_classes, config.in_channels, config.image_height) == ("labels", 6, 3, SIZE)
    return train_judge(x, y, config)


@pytest.fixture(scope="module")
def reference(judge, shapes):
    return reference_of(judge, *shapes["test"])


# --- Fréchet distance ----------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 4, 16])
def test_frechet_distance_matches_scipy(d):
    rng = np.random.default_rng(d)
    for _ in range(3):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = random_spd(rng, d), random_spd(rng, d)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-7)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu, s = rng.normal(size=8), random_spd(rng, 8)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)
    a, b = rng.uniform(0.1, 3.0, size=8), rng.uniform(0.1, 3.0, size=8)
    mu2 = mu + 0.5
    expected = 8 * 0.25 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(torch.tensor(mu), torch.diag(torch.tensor(a)), torch.tensor(mu2), torch.diag(torch.tensor(b)))
    assert got == pytest.approx(expected, rel=1e-10)
    # singular covariances (fewer samples than dimensions) stay finite and >= 0
    assert frechet_distance(mu, np.zeros((8, 8)), mu2, np.outer(a, a)) == pytest.approx(2.0 + np.sum(a * a))


def test_feature_stats_and_frechet_distance_of():
    rng = np.random.default_rng(1)
    fa, fb = rng.normal(size=(50, 6)), rng.normal(loc=1.0, size=(40, 6))
    mu, sigma = feature_stats(torch.tensor(fa, dtype=torch.float32))
    assert mu.dtype == sigma.dtype == torch.float64
    np.testing.assert_allclose(mu.numpy(), fa.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma.numpy(), np.cov(fa, rowvar=False), rtol=1e-5)
    expected = scipy_frechet(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))
    assert frechet_distance_of(fa, fb) == pytest.approx(expected, rel=1e-7)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(VQGenError, match="shapes do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(VQGenError, match="at least 2 images"):
        feature_stats(np.zeros((1, 3)))
    with pytest.raises(VQGenError, match="NaN"):
        frechet_distance_of(np.full((4, 2), np.nan), np.zeros((4, 2)))


# --- the judge on labelled shapes ------------------------------------------------------


def test_real_samples_score_near_the_floor_and_noise_far(judge, shapes, reference):
    (x, y), (xf, yf) = shapes["train"], shapes["fresh"]
    floor = reference_floor(judge, x, reference, n=300, seed=0, train_labels=y)
    real = sample_quality(judge, xf, yf, reference)
    bad = sample_quality(judge, noise(300, 0), None, reference)
    print(f"\nfloor {floor}\nreal  {real}\nnoise {bad}")
    assert real["fid"] < 3 * floor["fid"] + 0.05
    assert bad["fid"] > 10 * real["fid"] and bad["fid"] > 5 * floor["fid"]
    assert real["judge_test_accuracy"] > 0.6 and floor["class_accuracy"] > 0.6
    assert real["coverage"] > 0.9 and floor["coverage"] > 0.9
    assert "class_accuracy" not in bad


def test_reference_floor_scores_a_transform_of_the_same_picked_images(judge, shapes, reference):
    """The reconstructions' row of `vqgen eval`: the transform sees exactly the n images the floor picks,
    an identity changes nothing, and a damaging one (noise) moves the FID far from the floor."""
    x, y = shapes["train"]
    seen = []

    def identity(images):
        seen.append(images)
        return images

    floor = reference_floor(judge, x, reference, n=200, seed=4, train_labels=y)
    assert reference_floor(judge, x, reference, n=200, seed=4, train_labels=y, transform=identity) == floor
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(4))[:200]
    assert len(seen) == 1 and torch.equal(seen[0], x[pick])
    noisy = reference_floor(judge, x, reference, n=200, seed=4, train_labels=y,
                            transform=lambda images: noise(len(images), 1))
    assert noisy["fid"] > 5 * floor["fid"] and noisy["class_accuracy"] < floor["class_accuracy"]


def test_reference_holds_the_test_images_statistics(judge, shapes, reference):
    """Computed once, the reference gives the FID of the samples' and test images' features, and the
    judge's accuracy on the test images (None when a labels judge is given none)."""
    (xt, yt), (xf, yf) = shapes["test"], shapes["fresh"]
    expected = frechet_distance_of(judge_features(judge, xf), judge_features(judge, xt))
    assert sample_quality(judge, xf, yf, reference)["fid"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert reference.judge_test_accuracy == judge_accuracy(judge, xt, yt)
    assert reference_of(judge, xt, None).judge_test_accuracy is None
    assert "judge_test_accuracy" not in sample_quality(judge, xf, yf, reference_of(judge, xt, None))


def test_class_accuracy_with_true_and_shuffled_labels(judge, shapes, reference):
    xf, yf = shapes["fresh"]
    shuffled = yf[torch.randperm(len(yf), generator=torch.Generator().manual_seed(0))]
    true = sample_quality(judge, xf, yf, reference)["class_accuracy"]
    wrong = sample_quality(judge, xf, shuffled, reference)["class_accuracy"]
    assert true > 0.6 and wrong < 0.35, (true, wrong)


def test_judge_trained_on_shuffled_labels_is_unreliable(judge, shapes):
    (x, y), (xt, yt) = shapes["train"], shapes["test"]
    bad = train_judge(x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))],
                      JudgeConfig.for_data(x, y, **TINY))
    reliable, accuracy = judge_is_reliable(bad, xt, yt)
    assert not reliable and accuracy < 1 / 3, accuracy
    reliable, accuracy = judge_is_reliable(judge, xt, yt)
    assert reliable and accuracy > 0.6, accuracy


def test_unlabelled_data_trains_the_rotation_task(shapes):
    (x, _), (xt, _), (xf, _) = shapes["train"], shapes["test"], shapes["fresh"]
    rot = train_judge(x, None, JudgeConfig(image_height=SIZE, image_width=SIZE, num_classes=6, task="labels", **TINY))
    assert rot.config.task == "rotation" and rot.config.num_classes == 0 and rot.head.out_features == 4
    rotations = reference_of(rot, xt, None)
    real = sample_quality(rot, xf, None, rotations)
    bad = sample_quality(rot, noise(300, 1), None, rotations)
    print(f"\nrotation real {real}\nrotation noise {bad}")
    assert set(real) == {"n_samples", "fid", "judge_test_accuracy", "judge_chance",
                         "kid", "kid_std_error", "precision", "recall", "density", "coverage_nn"}
    assert bad["fid"] > 10 * real["fid"]
    # 5 of the 6 shapes look the same turned by 90 degrees: on them rotation is barely learnable,
    # so the check says so; on triangles alone it is learnt and the judge counts as reliable
    assert real["judge_test_accuracy"] > 0.25
    tri, tri_test = make_shapes(1800, 1, size=SIZE), make_shapes(600, 2, size=SIZE)
    tri, tri_test = tri[0][tri[1] == 2], tri_test[0][tri_test[1] == 2]
    tri_judge = train_judge(tri, None, JudgeConfig.for_data(tri, None, **{**TINY, "steps": 80}))
    reliable, accuracy = judge_is_reliable(tri_judge, tri_test, None)
    print(f"rotation accuracy: all shapes {real['judge_test_accuracy']:.3f}, triangles {accuracy:.3f}")
    assert reliable and accuracy > 0.8


def test_grey_non_square_images_and_progress():
    x = make_shapes(40, 4, size=16)[0][:, :1, :, 2:14]  # (40, 1, 16, 12)
    judge = train_judge(x, None, JudgeConfig(in_channels=1, image_height=16, image_width=12, steps=2, width=4))
    assert judge_features(judge, x).shape == (40, 16)
    assert 0.0 <= judge_accuracy(judge, x, None) <= 1.0
    steps = []
    labelled = train_judge(x, torch.arange(40) % 3,
                           JudgeConfig.for_data(x, torch.arange(40) % 3, steps=2, width=4),
                           progress=lambda step, loss: steps.append((step, loss)))
    assert [s for s, _ in steps] == [1, 2] and labelled.config.task == "labels"


def test_training_is_deterministic_and_leaves_the_global_rng_alone(shapes):
    x, y = shapes["train"]
    cfg = JudgeConfig.for_data(x, y, width=8, steps=3, batch_size=16)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = train_judge(x, y, cfg), train_judge(x, y, cfg)
    assert torch.rand(1) == before
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_save_load_round_trip(judge, shapes, tmp_path):
    save_judge(judge, tmp_path / "judge")
    loaded = load_judge(tmp_path / "judge")
    assert loaded.config == judge.config and isinstance(loaded, Judge)
    x = shapes["test"][0][:50]
    assert torch.equal(judge_features(loaded, x), judge_features(judge, x))


# --- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("images, message", [
    (torch.zeros(4, 3, SIZE, SIZE), "float32"),
    (torch.zeros(4, SIZE, SIZE, dtype=torch.uint8), r"\(4, 16, 16\)"),
    (torch.zeros(4, 2, SIZE, SIZE, dtype=torch.uint8), r"\(4, 2, 16, 16\)"),
    (torch.zeros(4, 3, 4, 4, dtype=torch.uint8), r"\(4, 3, 4, 4\)"),
])
def test_bad_images_are_refused(judge, reference, images, message):
    with pytest.raises(VQGenError, match=message):
        sample_quality(judge, images, None, reference)
    with pytest.raises(VQGenError, match=message):
        reference_of(judge, images, None)
    with pytest.raises(VQGenError, match=message):
        train_judge(images, None, JudgeConfig(steps=1))


def test_bad_labels_and_sizes_are_refused(judge, shapes, reference):
    (x, y), (xt, yt) = shapes["train"], shapes["test"]
    with pytest.raises(VQGenError, match=r"shape \(600,\), got dtype torch.int64, shape \(599,\)"):
        train_judge(x, y[:-1], JudgeConfig.for_data(x, y, steps=1))
    with pytest.raises(VQGenError, match=r"\[0, 6\), got values 6\.\.6"):
        sample_quality(judge, xt, torch.full((300,), 6), reference)
    with pytest.raises(VQGenError, match="int64"):
        judge_accuracy(judge, xt, yt.int())
    with pytest.raises(VQGenError, match=r"\(3, 32, 32\), the judge was trained on \(3, 16, 16\)"):
        judge_features(judge, make_shapes(4, 0, size=32)[0])
    with pytest.raises(VQGenError, match="needs the images' labels"):
        judge_accuracy(judge, xt, None)
    with pytest.raises(VQGenError, match="n must be in"):
        reference_floor(judge, x, reference, n=601)


@pytest.mark.parametrize("change, message", [
    (dict(steps=-1), "steps must be >= 0, got -1"),
    (dict(task="colour"), "task must be one of"),
    (dict(num_classes=1), "num_classes must be >= 2"),
    (dict(task="rotation", num_classes=-1), "num_classes must be >= 0"),
    (dict(in_channels=2), "in_channels must be 1 or 3, got 2"),
    (dict(image_height=4), r"image size must be .*\(4, 32\)"),
    (dict(learning_rate=0.0), "learning_rate must be > 0"),
])
def test_bad_judge_config(change, message):
    with pytest.raises(VQGenError, match=message) as err:
        JudgeConfig(**{"num_classes": 6, "task": "labels", **change})
    assert "\n" not in str(err.value)


# --- Inception FID ---------------------------------------------------------------------


def test_inception_fid_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # makes `import torch_fidelity` fail
    with pytest.raises(VQGenError, match="needs torch-fidelity.*pip install torch-fidelity") as err:
        inception_scores(noise(4, 0), noise(4, 1))
    assert "\n" not in str(err.value)


def test_inception_fid_without_weights_and_its_call_path(monkeypatch):
    fake = types.ModuleType("torch_fidelity")

    def offline(**kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>\nmore")

    fake.calculate_metrics = offline
    monkeypatch.setitem(sys.modules, "torch_fidelity", fake)
    with pytest.raises(VQGenError, match="name resolution.*network access") as err:
        inception_scores(noise(4, 0), noise(4, 1))
    assert "\n" not in str(err.value)

    seen = {}

    def ok(input1, input2, fid, kid, prc, **kwargs):
        seen.update(first=input1[0], n=(len(input1), len(input2)), asked=(fid, kid, prc), **kwargs)
        return {"frechet_inception_distance": 12.5, "kernel_inception_distance_mean": 0.25,
                "kernel_inception_distance_std": 0.01, "precision": 0.5, "recall": 0.75, "f_score": 0.6}

    fake.calculate_metrics = ok
    grey = torch.zeros(5, 1, 8, 8, dtype=torch.uint8)
    assert inception_scores(grey, noise(3, 0)) == {"fid": 12.5, "kid": 0.25, "kid_subset_std": 0.01,
                                                   "precision": 0.5, "recall": 0.75}
    assert seen["first"].shape == (3, 8, 8) and seen["first"].dtype == torch.uint8
    assert seen["n"] == (5, 3) and seen["asked"] == (True, True, True)
    assert seen["kid_subset_size"] == 3 and seen["prc_neighborhood"] == 3  # KID's subsets fit the smaller set
