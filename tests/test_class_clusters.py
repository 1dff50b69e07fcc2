"""Clusters within the classes of labelled data: the code dump stores them, the prior conditions on them,
`--label` still picks the class and sampling draws the class's clusters by their shares of it."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_DATA, TINY_TRANSFORMER, TINY_VQVAE, tiny_train
from stage1_vqvae.encode import IMAGES_PER_CLASS_CLUSTER, cluster_within_classes, clusters_per_class
from vqgen.core.data.config import DataConfig
from vqgen.core.runtime.errors import VQGenError


def test_clusters_per_class_follow_the_class_sizes():
    small, big = IMAGES_PER_CLASS_CLUSTER - 1, 100 * IMAGES_PER_CLASS_CLUSTER
    assert clusters_per_class([small, 2 * IMAGES_PER_CLASS_CLUSTER, big], most=4) == [1, 2, 4]
    assert clusters_per_class([big, 0], most=0) == [1, 1]  # off: each class is its own one condition
    with pytest.raises(VQGenError, match="class_clusters must be >= 0 \\(0: off\\), got -1"):
        DataConfig(class_clusters=-1)


def test_clusters_lie_within_their_class_and_repeat_for_a_seed():
    """Two classes, each of two well-separated kinds: the clusters split each class by kind, never mix the
    classes, send each test grid to its own class's nearest centre, and come out the same for a seed."""
    g = torch.Generator().manual_seed(0)
    kinds = torch.tensor([[0.0] * 8, [5.0] * 8, [0.0] * 4 + [5.0] * 4, [5.0] * 4 + [0.0] * 4])
    kind_train = torch.arange(4).repeat_interleave(30)
    x_train = kinds[kind_train] + 0.1 * torch.randn(120, 8, generator=g)
    y_train = kind_train // 2                                     # class 0: kinds 0 and 1; class 1: kinds 2 and 3
    kind_test = torch.tensor([0, 1, 2, 3, 1, 2])
    x_test, y_test = kinds[kind_test] + 0.1 * torch.randn(6, 8, generator=g), kind_test // 2
    train, test, owners = cluster_within_classes(x_train, y_train, x_test, y_test, [2, 2], seed=5)
    assert owners == (0, 0, 1, 1)
    assert torch.equal(torch.tensor(owners)[train], y_train) and torch.equal(torch.tensor(owners)[test], y_test)
    for kind in range(4):  # each kind is one cluster
        assert train[kind_train == kind].unique().numel() == 1
    assert train[kind_train == 0][0] != train[kind_train == 1][0]
    for i, kind in enumerate(kind_test.tolist()):
        assert test[i] == train[kind_train == kind][0]
    again = cluster_within_classes(x_train, y_train, x_test, y_test, [2, 2], seed=5)
    assert torch.equal(again[0], train) and torch.equal(again[1], test)
    one = cluster_within_classes(x_train, y_train, x_test, y_test, [1, 2], seed=5)
    assert one[2] == (0, 1, 1) and set(one[0][y_train == 0].tolist()) == {0}


@pytest.fixture(scope="module")
def clustered_run(tmp_path_factory):
    """A tiny labelled run whose code dump splits each class into up to 3 clusters, and its prior."""
    from stage1_vqvae.train import train_vqvae
    from stage2_prior.train import train_prior

    run = tmp_path_factory.mktemp("clustered") / "run"
    with pytest.MonkeyPatch.context() as mp:  # tiny classes hold ~16 images; only this run is split finer
        mp.setattr("stage1_vqvae.encode.IMAGES_PER_CLASS_CLUSTER", 4)
        train_vqvae(run, DataConfig(**{**TINY_DATA.__dict__, "class_clusters": 3}), tiny_train(max_steps=6),
                    TINY_VQVAE)
    train_prior(run, "transformer", tiny_train(max_steps=2), TINY_TRANSFORMER)
    return run


def test_the_code_dump_stores_the_clusters_and_encoding_again_repeats_them(clustered_run, tmp_path):
    import shutil

    from vqgen.cli import main
    from vqgen.core.store.codes import load_codes

    splits, meta = load_codes(clustered_run / "codes")
    owners = torch.tensor(meta.condition_classes)
    assert meta.num_conditions == len(owners) > meta.num_classes == 6
    for split in splits.values():
        assert torch.equal(owners[split.conditions], split.labels)
    copy = tmp_path / "copy"
    shutil.copytree(clustered_run, copy)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("stage1_vqvae.encode.IMAGES_PER_CLASS_CLUSTER", 4)
        assert main(["encode", "--run", str(copy), "--class-clusters", "3"]) == 0
    again, meta_again = load_codes(copy / "codes")
    assert meta_again.condition_classes == meta.condition_classes
    assert all(torch.equal(again[s].conditions, splits[s].conditions) for s in splits)
    from safetensors.torch import load_file, save_file

    labels_file = copy / "codes" / "train" / "labels.safetensors"
    stored = load_file(str(labels_file))
    save_file({**stored, "conditions": torch.zeros_like(stored["conditions"])}, str(labels_file))  # all class 0
    with pytest.raises(VQGenError, match=r"clusters within classes do not match .* \(re-run `vqgen encode`\)"):
        load_codes(copy / "codes")  # a tampered dump: refused in one line, not an index error in the prior
    assert main(["encode", "--run", str(copy), "--class-clusters", "0"]) == 0  # off: the classes alone
    off, meta_off = load_codes(copy / "codes")
    assert meta_off.condition_classes == () and off["train"].conditions is None


def test_the_prior_conditions_on_the_clusters_and_a_class_only_draws_its_own(clustered_run, monkeypatch):
    import vqgen.run
    from vqgen.run import Run

    run = Run.load(clustered_run)
    owners = run.source.condition_classes
    assert run.prior.config.num_classes == len(owners) and len(run.class_names) == 6
    assert sum(run.source.class_frequencies) == pytest.approx(1.0)
    for c in range(6):  # each class's clusters share it whole
        assert sum(f for f, o in zip(run.source.condition_frequencies, owners) if o == c) == pytest.approx(1.0)

    cycled = run.label_plan(None, 12).of(torch.arange(12))  # without --label: every class in turn, not cluster
    assert cycled.tolist() == list(range(6)) * 2

    seen = []
    real = vqgen.run.sample_codes
    monkeypatch.setattr(vqgen.run, "sample_codes", lambda *a, labels, **k: seen.append(labels) or real(
        *a, labels=labels, **k))
    label = 2
    codes, _ = run.sample(vqgen.run.Accelerator(cpu=True), 300, run.label_plan(["2"], 300), seed=4)
    drawn = torch.cat(seen)
    assert {owners[int(i)] for i in drawn} == {label}, "a class's samples only ever condition on its own clusters"
    assert all(run.source.condition_frequencies[int(i)] > 0 for i in drawn.unique()), "an empty cluster never"
    mine = [i for i, o in enumerate(owners) if o == label]
    counts = torch.bincount(drawn, minlength=len(owners))[mine].double()
    expected = torch.tensor([run.source.condition_frequencies[i] for i in mine], dtype=torch.double) * 300
    assert (counts - expected).abs().max() < 5 * expected.clamp_min(1).sqrt().max()  # drawn by their shares
    seen.clear()
    again, _ = run.sample(vqgen.run.Accelerator(cpu=True), 300, run.label_plan(["2"], 300), seed=4)
    assert torch.equal(torch.cat(seen), drawn) and torch.equal(again, codes)
    seeds = vqgen.run.sample_seeds(4, torch.arange(50, 100))
    assert torch.equal(run.source.conditions(torch.full((50,), label), seeds), drawn[50:100]), \
        "sample i's cluster depends on (seed, i) alone, not on the batch"
    null = run.source.conditions(torch.tensor([6, 0]), torch.tensor([1, 2]))
    assert int(null[0]) == len(owners) and owners[int(null[1])] == 0  # the null class stays null (guidance)
    with pytest.raises(VQGenError, match=r"labels must be in \[0, 6\] \(6 = null class\), got 7"):
        run.source.conditions(torch.tensor([7]), torch.tensor([0]))
    assert "bits_per_code" in run.evaluate()  # the test codes' own clusters


def test_runs_from_before_the_clusters_load_and_sample_unchanged(tiny_run, tmp_path):
    """A run whose codes and prior were written at format 5 (no clusters within classes) loads, conditions
    on its classes and samples the same codes as before."""
    import shutil

    from vqgen.core.store.codes import load_codes
    from vqgen.run import Run

    before = Run.load(tiny_run)
    expected, _ = before.sample(__import__("accelerate").Accelerator(cpu=True), 4, before.label_plan(None, 4), seed=1)
    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    for path in (old / "codes" / "meta.json", old / "prior" / "source.json"):
        data = json.loads(path.read_text())
        assert data.pop("condition_classes") == []
        data.pop("condition_frequencies", None)
        path.write_text(json.dumps({**data, "format_version": 5}))
    splits, meta = load_codes(old / "codes")
    assert meta.condition_classes == () and splits["train"].conditions is None
    run = Run.load(old)
    assert run.source.condition_classes == () and run.prior.config.num_classes == len(run.class_names)
    codes, _ = run.sample(__import__("accelerate").Accelerator(cpu=True), 4, run.label_plan(None, 4), seed=1)
    assert torch.equal(codes, expected)
