"""Augmentation: what it does to a batch, that it only moves pixels, and the augmented code dump."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_DATA, TINY_VQVAE, tiny_train
from vqgen.core.data.augment import augment, with_augmented_copies
from vqgen.core.data.config import DataConfig, parse_augment
from vqgen.core.data.images import ImageSplit
from vqgen.core.runtime.errors import VQGenError


def test_parse_augment():
    assert parse_augment("none") == ()
    assert parse_augment("flip, Translate") == ("flip", "translate")
    with pytest.raises(VQGenError, match="unknown augmentation 'rotate'; expected 'none' or a comma list of flip"):
        parse_augment("flip,rotate")
    with pytest.raises(VQGenError, match="code_copies=2 needs augment"):
        DataConfig(code_copies=2)


def test_flip_mirrors_about_half_the_images_exactly():
    x = torch.randn(400, 3, 8, 8)
    y = augment(x, ("flip",), torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(a, b.flip(-1)) for a, b in zip(y, x)])
    kept = torch.tensor([torch.equal(a, b) for a, b in zip(y, x)])
    assert bool((flipped | kept).all()) and 150 < int(flipped.sum()) < 250


def test_translate_shifts_whole_images_within_an_eighth_of_the_side():
    x = torch.arange(16 * 16, dtype=torch.float32).reshape(1, 1, 16, 16).repeat(64, 1, 1, 1)
    y = augment(x, ("translate",), torch.Generator().manual_seed(1))
    shifts = set()
    for image in y[:, 0]:
        # the centre pixel of the original (value 8*16+8) lands at (8+dy, 8+dx): every pixel moved alike
        dy, dx = [int(v[0]) - 8 for v in torch.nonzero(image == 8 * 16 + 8, as_tuple=True)]
        assert abs(dy) <= 2 and abs(dx) <= 2
        assert torch.equal(image[4:12, 4:12], x[0, 0, 4 - dy:12 - dy, 4 - dx:12 - dx])
        shifts.add((dy, dx))
    assert len(shifts) > 5  # different images, different shifts
    assert set(y.unique().tolist()) <= set(x.unique().tolist())  # edge pixels repeated, nothing invented


def test_augmented_copies_follow_the_originals_and_are_reproducible():
    images = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    split = ImageSplit(images, torch.arange(10))
    a = with_augmented_copies(split, ("flip", "translate"), copies=2, seed=7)
    b = with_augmented_copies(split, ("flip", "translate"), copies=2, seed=7)
    assert len(a) == 30 and torch.equal(a.images[:10], images) and torch.equal(a.images, b.images)
    assert torch.equal(a.labels, torch.arange(10).repeat(3))
    assert not torch.equal(a.images[10:20], images)


def test_stage1_trains_with_augmentation_and_dumps_more_training_grids(tmp_path):
    from stage1_vqvae.train import train_vqvae
    from vqgen.core.store.codes import load_codes

    data = DataConfig(**{**TINY_DATA.__dict__, "augment": "flip,translate", "code_copies": 2})
    train_vqvae(tmp_path / "run", data, tiny_train(max_steps=4), TINY_VQVAE)
    splits, meta = load_codes(tmp_path / "run" / "codes")
    assert len(splits["train"]) == 3 * TINY_DATA.builtin_train_size and meta.train_copies == 2
    assert len(splits["test"]) == TINY_DATA.builtin_test_size  # never augmented
    assert torch.equal(splits["train"].labels[:96], splits["train"].labels[96:192])


def test_unlabelled_data_gets_clusters_that_the_prior_conditions_on(tmp_path):
    """An unlabelled folder's code dump carries k-means clusters of the codes as pseudo-classes; the prior
    conditions on them and sampling draws them as often as they occur (an empty cluster never)."""
    from conftest import TINY_TRANSFORMER
    from stage1_vqvae.train import train_vqvae
    from stage2_prior.train import train_prior
    from vqgen.core.store.codes import load_codes
    from vqgen.run import Run

    data = DataConfig(**{**TINY_DATA.__dict__, "label_column": "none", "pseudo_classes": 5})
    run = tmp_path / "run"
    train_vqvae(run, data, tiny_train(max_steps=6), TINY_VQVAE)
    splits, meta = load_codes(run / "codes")
    assert meta.pseudo_labels and meta.class_names == tuple(f"cluster{i}" for i in range(5))
    assert int(splits["train"].labels.max()) < 5 and len(splits["test"].labels) == len(splits["test"])
    train_prior(run, "transformer", tiny_train(max_steps=2), TINY_TRANSFORMER)
    loaded = Run.load(run)
    assert loaded.source.pseudo_labels and loaded.prior.config.num_classes == 5
    assert sum(loaded.source.class_frequencies) == pytest.approx(1.0)
    plan = loaded.label_plan(None, 200, seed=3)
    labels = plan.of(torch.arange(200))
    assert torch.equal(labels, loaded.label_plan(None, 200, seed=3).of(torch.arange(200)))
    assert torch.equal(labels[150:], plan.of(torch.arange(150, 200))), "sample i's label depends on (seed, i) alone"
    empty = [i for i, f in enumerate(loaded.source.class_frequencies) if f == 0]
    assert not any(int(label) in empty for label in labels)
    from vqgen.cli import main

    assert main(["sample", "--run", str(run), "--n", "3", "--out", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "settings.json").read_text())["cfg"] == 1.5  # guidance on clusters too
    assert main(["sample", "--run", str(run), "--n", "3", "--cfg", "2", "--out", str(tmp_path / "t")]) == 0
    assert json.loads((tmp_path / "t" / "settings.json").read_text())["cfg"] == 2.0

    off = DataConfig(**{**data.__dict__, "pseudo_classes": 0})
    train_vqvae(tmp_path / "off", off, tiny_train(max_steps=2), TINY_VQVAE)
    assert load_codes(tmp_path / "off" / "codes")[1].num_classes == 0
    with pytest.raises(VQGenError, match="pseudo_classes must be 0 \\(off\\) or >= 2, got 1"):
        DataConfig(pseudo_classes=1)


def test_clustering_features_see_where_codes_lie():
    """Two kinds of grid that differ only in where a patch of one code sits inside the same quarter of
    the grid: the quarter averages the clustering once used cannot tell them apart, the whole-grid
    features must, and k-means on them must split the kinds exactly. The features stay FEATURE_DIM
    numbers, and the projection bounded, for any grid."""
    from stage1_vqvae.config import VQVAEConfig
    from stage1_vqvae.encode import FEATURE_DIM, MAX_FEATURE_INPUT, GridFeatures, cluster_features
    from stage1_vqvae.model import VQVAE

    torch.manual_seed(0)
    cfg = VQVAEConfig(**{**TINY_VQVAE, "image_height": 64, "image_width": 64})  # 16x16 grid, 8 x 256 numbers
    model = VQVAE(cfg).eval()
    features = GridFeatures(cfg, seed=0)
    assert features.grid == (16, 16) and features.projection.shape == (8 * 16 * 16, FEATURE_DIM)
    assert torch.equal(features.projection, GridFeatures(cfg, seed=0).projection)
    grids = torch.zeros(40, 16, 16, dtype=torch.long)
    grids[:20, 0:2, 0:2] = 3  # kind a: a patch of code 3 in the corner ...
    grids[20:, 5:7, 5:7] = 3  # ... kind b: further in, the same top-left quarter
    grids[:, 12, 12] = torch.randint(4, 16, (40,))  # and variety elsewhere, alike in both kinds
    quarters = torch.nn.functional.adaptive_avg_pool2d(model.quantizer.decode_indices(grids).float(), 2)
    assert torch.allclose(quarters[:20, :, 0, 0], quarters[20:, :, 0, 0])
    x = features(model, grids, chunk=7)
    assert x.shape == (40, FEATURE_DIM) and torch.allclose(x, features(model, grids))
    clusters, _ = cluster_features(x, x[:2], k=2, seed=0)
    assert len(set(clusters[:20].tolist())) == 1 and len(set(clusters[20:].tolist())) == 1
    assert clusters[0] != clusters[20]

    big = GridFeatures(VQVAEConfig(**{**TINY_VQVAE, "code_dim": 128, "image_height": 128, "image_width": 128}), 0)
    assert big.grid == (16, 16) and big.projection.shape[0] <= MAX_FEATURE_INPUT  # 32x32x128: pooled once
    tiny = GridFeatures(VQVAEConfig(**{**TINY_VQVAE, "image_height": 16, "image_width": 16}), 0)
    assert tiny.projection is None  # a 4x4 grid of 8: 128 numbers, its own feature
    assert GridFeatures(VQVAEConfig(**TINY_VQVAE), 0).projection.shape == (8 * 8 * 8, FEATURE_DIM)
