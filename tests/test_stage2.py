"""Stage 2 training: files, held-out bits, exact resume, refusals of codes that do not fit."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_MASKED, TINY_PIXELCNN, TINY_TRANSFORMER, tiny_train
from stage2_prior.registry import load_prior
from stage2_prior.train import train_prior
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store.codes import CodesMeta, load_codes, save_codes
from vqgen.core.store.configs import load_config
from vqgen.core.store.layout import RunLayout

SIZES = {"transformer": TINY_TRANSFORMER, "pixelcnn": TINY_PIXELCNN, "masked": TINY_MASKED}


def copy_stage1(tiny_run, tmp_path):
    run = tmp_path / "run"
    for part in ("vqvae", "codes"):
        shutil.copytree(tiny_run / part, run / part)
    return run


@pytest.mark.parametrize("kind", ["transformer", "pixelcnn"])
def test_prior_trains_and_reports_held_out_bits(tiny_run, tmp_path, kind):
    run = copy_stage1(tiny_run, tmp_path)
    metrics = train_prior(run, kind, tiny_train(max_steps=20, eval_every=10), SIZES[kind])
    for name in ("config.json", "model.safetensors", "source.json", "metrics.jsonl", "train_config.json"):
        assert (run / "prior" / name).is_file(), name
    lines = [json.loads(x) for x in (run / "prior" / "metrics.jsonl").read_text().splitlines()]
    tests = [r for r in lines if r["split"] == "test"]
    assert [r["step"] for r in tests] == [10, 20]
    assert metrics["bits_per_image"] == pytest.approx(metrics["bits_per_code"] * 64)
    assert metrics["bits_per_code"] < 4.0  # uniform over K=16 codes is 4 bits: it learned something
    train = [r for r in lines if r["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    prior, source = load_prior(RunLayout(run).prior)
    assert prior.config.num_classes == 6 and len(source.class_names) == 6


@pytest.mark.parametrize("kind", ["transformer", "masked"])  # the masked prior also draws its masks
def test_prior_resume_continues_exactly(tiny_run, tmp_path, kind):
    a, b = tmp_path / "a", tmp_path / "b"
    for run in (a, b):
        shutil.copytree(tiny_run / "vqvae", run / "vqvae")
        shutil.copytree(tiny_run / "codes", run / "codes")
    cfg = {**SIZES[kind], "dropout": 0.1}  # dropout and label dropout draw random numbers
    train_prior(a, kind, tiny_train(max_steps=8, save_every=4), cfg)
    train_prior(b, kind, tiny_train(max_steps=4, save_every=4), cfg)
    other = "masked" if kind == "transformer" else "transformer"
    with pytest.raises(VQGenError, match=f"cannot resume: .* holds a {kind} prior, not a {other} prior"):
        train_prior(b, other, tiny_train(max_steps=8, save_every=4), resume=True)
    train_prior(b, None, tiny_train(max_steps=8, save_every=4), cfg, resume=True)  # no kind: the saved one
    wa, wb = load_file(a / "prior/model.safetensors"), load_file(b / "prior/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_codes_from_another_vqvae_are_refused(tiny_run, tmp_path):
    run = copy_stage1(tiny_run, tmp_path)
    weights = load_file(run / "vqvae/model.safetensors")
    weights["decoder.net.0.bias"] += 1.0  # now a different VQ-VAE than the one that made the codes
    save_file(weights, run / "vqvae/model.safetensors")
    with pytest.raises(VQGenError, match="codes were made by VQ-VAE [0-9a-f]{16} but .* holds VQ-VAE [0-9a-f]{16}"):
        train_prior(run, "transformer", tiny_train(max_steps=2), TINY_TRANSFORMER)
    train_prior(run, "transformer", tiny_train(max_steps=2), TINY_TRANSFORMER, allow_vqvae_mismatch=True)


def test_resume_with_codes_of_another_codebook_size_is_refused(tiny_run, tmp_path):
    run = copy_stage1(tiny_run, tmp_path)
    train_prior(run, "transformer", tiny_train(max_steps=2, save_every=2), TINY_TRANSFORMER)
    splits, meta = load_codes(run / "codes")
    other = CodesMeta(**{**meta.__dict__, "codebook_size": 32})
    save_codes(run / "codes", splits, other)
    with pytest.raises(VQGenError, match="codebook_size is 32 here but the saved prior has 16"):
        train_prior(run, "transformer", tiny_train(max_steps=4), TINY_TRANSFORMER, resume=True,
                    allow_vqvae_mismatch=True)


def test_bad_inputs(tiny_run, tmp_path):
    run = copy_stage1(tiny_run, tmp_path)
    with pytest.raises(VQGenError, match="no code grids at"):
        train_prior(tmp_path / "nothing", "transformer", tiny_train())
    with pytest.raises(VQGenError, match="prior must be one of"):
        train_prior(run, "lstm", tiny_train())
    with pytest.raises(VQGenError, match="do not apply to the transformer prior"):
        train_prior(run, "transformer", tiny_train(), {"channels": 8})
    with pytest.raises(VQGenError, match="nothing to resume: no saved training state"):
        train_prior(run, "transformer", tiny_train(), resume=True)
    (run / "codes" / "meta.json").unlink()
    with pytest.raises(VQGenError, match="has no meta.json"):
        train_prior(run, "transformer", tiny_train())


def test_labels_requested_where_there_are_none_and_empty_split(tiny_run, tmp_path):
    run = copy_stage1(tiny_run, tmp_path)
    splits, meta = load_codes(run / "codes")
    unlabelled = {k: type(v)(codes=v.codes, labels=None) for k, v in splits.items()}
    save_codes(run / "codes", unlabelled, CodesMeta(**{**meta.__dict__, "num_classes": 0, "class_names": ()}))
    with pytest.raises(VQGenError, match="conditional training asked for, but the codes in .* have no labels"):
        train_prior(run, "transformer", tiny_train(), labels="yes")
    save_codes(run / "codes", {"train": unlabelled["train"]}, CodesMeta(**{**meta.__dict__, "num_classes": 0, "class_names": ()}))
    with pytest.raises(VQGenError, match="no 'test' grids"):
        train_prior(run, "transformer", tiny_train())
    assert load_config(CodesMeta, run / "codes" / "meta.json").num_classes == 0


def test_codes_stay_int16_in_memory_and_batches_are_int64(tiny_run):
    from stage2_prior.train import CodesDataset

    splits, meta = load_codes(tiny_run / "codes")
    train = splits["train"]
    assert train.codes.dtype == torch.int16  # a quarter of int64's memory for the whole split
    batch = CodesDataset(train, use_labels=True).batch([3, 0, 5])
    assert batch["codes"].dtype == torch.int64
    assert torch.equal(batch["codes"], train.codes[[3, 0, 5]].long())
    assert torch.equal(batch["label"], train.labels[[3, 0, 5]])
