"""The prior's regularisers for little data: code dropout (what is replaced, and only in training), label
smoothing (the training loss only, never the held-out number) and the weight average (its rule, what is
evaluated and kept, exact resume)."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    TINY_DATA,
    TINY_MASKED,
    TINY_PIXELCNN,
    TINY_TRANSFORMER,
    TINY_VQVAE,
    tiny_train,
)
from einops import rearrange
from safetensors.torch import load_file
from torch import nn

from stage1_vqvae.train import train_vqvae
from stage2_prior.config import MaskedConfig, PixelCNNConfig, TransformerConfig
from stage2_prior.contract import drop_codes
from stage2_prior.masked import MaskedPrior, draw_masks, masked_loss
from stage2_prior.pixelcnn import PixelCNNPrior
from stage2_prior.raster import raster_loss
from stage2_prior.sampling import filter_logits
from stage2_prior.train import train_prior
from stage2_prior.transformer import TransformerPrior
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store.layout import RunLayout
from vqgen.core.training.average import AVERAGE_FILE, WeightAverage, average_decay
from vqgen.core.training.config import TrainConfig

GRID = dict(codebook_size=16, grid_height=4, grid_width=4, num_classes=3, label_dropout=0.0)
RASTER = [(TransformerPrior, TransformerConfig, TINY_TRANSFORMER), (PixelCNNPrior, PixelCNNConfig, TINY_PIXELCNN)]


def codes_and_labels(b: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 16, (b, 4, 4), generator=g), torch.randint(0, 3, (b,), generator=g)


# -- code dropout ------------------------------------------------------------------------------------------


def test_code_dropout_replaces_its_share_of_codes_by_codes_of_the_codebook():
    cfg = TransformerConfig(**GRID, code_dropout=0.3)
    codes = torch.randint(0, 16, (400, 4, 4))
    torch.manual_seed(0)
    dropped = drop_codes(codes, cfg)
    assert dropped.dtype == codes.dtype and dropped.shape == codes.shape
    assert dropped.min() >= 0 and dropped.max() < 16
    # a replaced code equals the old one with chance 1/K
    assert (dropped != codes).float().mean().item() == pytest.approx(0.3 * 15 / 16, abs=0.01)
    assert drop_codes(codes, TransformerConfig(**GRID)) is codes  # off: untouched, no random number drawn


@pytest.mark.parametrize("model_cls, config_cls, size", RASTER + [(MaskedPrior, MaskedConfig, TINY_MASKED)])
def test_code_dropout_acts_in_training_only(model_cls, config_cls, size):
    codes, labels = codes_and_labels()
    torch.manual_seed(0)
    plain = model_cls(config_cls(**GRID, **size))
    noisy = model_cls(config_cls(**GRID, **size, code_dropout=0.5))
    noisy.load_state_dict(plain.state_dict())
    extra = (torch.zeros_like(codes, dtype=torch.bool),) if model_cls is MaskedPrior else ()
    plain.eval(), noisy.eval()
    assert torch.equal(plain(codes, labels, *extra), noisy(codes, labels, *extra))
    plain.train(), noisy.train()
    torch.manual_seed(1)
    a = plain(codes, labels, *extra)
    torch.manual_seed(1)
    b = noisy(codes, labels, *extra)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("model_cls, config_cls, size", RASTER)
def test_with_code_dropout_a_raster_prior_still_never_sees_its_own_position_or_later(model_cls, config_cls, size):
    """The same random replacements (same seed) and codes that differ from position p on: the logits before p
    and at p are equal."""
    torch.manual_seed(0)
    model = model_cls(config_cls(**GRID, **size, code_dropout=0.5)).train()
    codes, labels = codes_and_labels()
    for p in (0, 5, 15):
        other = rearrange(codes.clone(), "b h w -> b (h w)")
        other[:, p:] = (other[:, p:] + 7) % 16
        other = rearrange(other, "b (h w) -> b h w", h=4)
        torch.manual_seed(2)
        a = rearrange(model(codes, labels), "b h w k -> b (h w) k")
        torch.manual_seed(2)
        b = rearrange(model(other, labels), "b h w k -> b (h w) k")
        assert torch.allclose(a[:, : p + 1], b[:, : p + 1], atol=1e-6)


def test_with_code_dropout_the_masked_prior_still_never_reads_a_hidden_code():
    torch.manual_seed(0)
    model = MaskedPrior(MaskedConfig(**GRID, **TINY_MASKED, code_dropout=0.5)).train()
    codes, labels = codes_and_labels()
    mask = torch.rand(codes.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    other = torch.where(mask, (codes + 5) % 16, codes)
    torch.manual_seed(4)
    a = model(codes, labels, mask)
    torch.manual_seed(4)
    assert torch.equal(a, model(other, labels, mask))


# -- label smoothing -------------------------------------------------------------------------------------------


def test_label_smoothing_changes_the_training_loss_and_not_the_logged_bits():
    torch.manual_seed(0)
    model = TransformerPrior(TransformerConfig(**GRID, **TINY_TRANSFORMER)).eval()
    codes, labels = codes_and_labels()
    logits = rearrange(model(codes, labels), "b h w k -> (b h w) k")
    loss, logs = raster_loss(model, codes, labels, smoothing=0.1)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, codes.flatten(), label_smoothing=0.1).item(), rel=1e-6)
    nll = F.cross_entropy(logits, codes.flatten()).item()
    assert logs["bits_per_code"].item() == pytest.approx(nll / math.log(2), rel=1e-6)
    assert abs(loss.item() - nll) > 1e-4  # near-uniform logits at initialisation: small, but real
    plain, plain_logs = raster_loss(model, codes, labels)
    assert plain.item() == pytest.approx(nll, rel=1e-6)
    assert torch.equal(plain_logs["bits_per_code"], logs["bits_per_code"])


def test_label_smoothing_of_the_masked_prior_scores_the_hidden_codes_only():
    torch.manual_seed(0)
    model = MaskedPrior(MaskedConfig(**GRID, **TINY_MASKED)).eval()
    codes, labels = codes_and_labels()
    torch.manual_seed(5)
    loss, logs = masked_loss(model, codes, labels, smoothing=0.2)
    torch.manual_seed(5)  # the same masks: drawn first, from the global RNG
    mask = rearrange(draw_masks(6, 16), "b (h w) -> b h w", h=4)
    logits = model(codes, labels, mask)[mask]
    assert loss.item() == pytest.approx(F.cross_entropy(logits, codes[mask], label_smoothing=0.2).item(), rel=1e-6)
    assert logs["bits_per_masked_code"].item() == pytest.approx(F.cross_entropy(logits, codes[mask]).item()
                                                                / math.log(2), rel=1e-6)


# -- the weight average ----------------------------------------------------------------------------------------


def test_the_weight_average_follows_its_rule_and_swaps_in_and_out():
    net = nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.fill_(1.0), net.bias.fill_(0.0)
    average = WeightAverage(net, decay=0.99)
    assert average_decay(0.99, 1) == pytest.approx(2 / 11) and average_decay(0.99, 10_000) == 0.99
    expected = torch.ones(1, 2)
    for step in (1, 2, 3):
        with torch.no_grad():
            net.weight.fill_(float(step + 1))
        average.update(step)
        d = (1 + step) / (10 + step)
        expected = d * expected + (1 - d) * (step + 1)
    assert torch.allclose(average.shadow["weight"], expected)
    with average.applied():
        assert torch.allclose(net.weight, expected)
    assert torch.equal(net.weight, torch.full((1, 2), 4.0))  # the training weights are back


def copy_stage1(tiny_run, tmp_path, name="run"):
    run = tmp_path / name
    for part in ("vqvae", "codes"):
        shutil.copytree(tiny_run / part, run / part)
    return run


def test_with_a_weight_average_the_run_evaluates_and_keeps_the_average(tiny_run, tmp_path):
    run = copy_stage1(tiny_run, tmp_path)
    train_prior(run, "transformer", tiny_train(max_steps=6, eval_every=6, save_every=6, weight_average=0.9),
                TINY_TRANSFORMER)
    state = RunLayout(run).prior.state(6)
    average = load_file(state / AVERAGE_FILE)
    kept = load_file(run / "prior/model.safetensors")
    trained = load_file(state / "model.safetensors")
    assert all(torch.equal(kept[name], average[name]) for name in average)
    assert not all(torch.equal(trained[name], average[name]) for name in average)
    # the held-out number is the kept weights' own
    test = [json.loads(x) for x in (run / "prior/metrics.jsonl").read_text().splitlines() if '"test"' in x]
    assert test[-1]["best_bits_per_code"] == test[-1]["bits_per_code"]


@pytest.mark.parametrize("kind", ["transformer", "masked"])
def test_resume_with_every_regulariser_on_continues_exactly(tiny_run, tmp_path, kind):
    a, b = copy_stage1(tiny_run, tmp_path, "a"), copy_stage1(tiny_run, tmp_path, "b")
    size = {"transformer": TINY_TRANSFORMER, "masked": TINY_MASKED}[kind]
    cfg = {**size, "dropout": 0.1, "code_dropout": 0.2, "label_smoothing": 0.1}
    train_prior(a, kind, tiny_train(max_steps=8, save_every=4, weight_average=0.95), cfg)
    train_prior(b, kind, tiny_train(max_steps=4, save_every=4, weight_average=0.95), cfg)
    with pytest.raises(VQGenError, match=r"cannot resume with weight_average=0\.9: the run was trained with "
                                         r"weight_average=0\.95 .*; resume without --weight-average$"):
        train_prior(b, None, {"max_steps": 8, "weight_average": 0.9}, resume=True)
    train_prior(b, None, {"max_steps": 8}, resume=True)
    kept = "model.safetensors"  # the kept weights, then the last state's average and training weights
    for where in (lambda run: run / "prior" / kept, lambda run: RunLayout(run).prior.state(8) / AVERAGE_FILE,
                  lambda run: RunLayout(run).prior.state(8) / kept):
        wa, wb = load_file(where(a)), load_file(where(b))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), where(a)


def test_code_dropout_is_sized_for_a_raster_prior_on_little_data_and_not_for_the_masked_one(tiny_run, tmp_path,
                                                                                            capsys):
    # 96 training grids of 64 codes, 60 steps of 16: 10 planned passes over little data (stage2_prior.train)
    sized = {}
    for kind, size in (("transformer", TINY_TRANSFORMER), ("masked", TINY_MASKED)):
        run = copy_stage1(tiny_run, tmp_path, kind)
        train_prior(run, kind, tiny_train(max_steps=60), size)
        sized[kind] = json.loads((run / "prior" / "config.json").read_text())["code_dropout"]
        # the class in every block, sized for both kinds of a conditional prior, says how to turn it off
        said = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
        assert "class_modulation True (6144 training codes, fewer than 500000; off with --no-class-modulation)" in said
    assert sized == {"transformer": 0.1, "masked": 0.0}


def test_bad_regulariser_options_are_refused_in_one_line(tiny_run, tmp_path):
    with pytest.raises(VQGenError, match=r"weight_average must be in \[0, 1\) \(0: off\), got 1\.0"):
        TrainConfig(weight_average=1.0)
    for name in ("code_dropout", "label_smoothing"):
        with pytest.raises(VQGenError, match=rf"{name} must be in \[0, 1\), got -0\.1"):
            TransformerConfig(**GRID, **{name: -0.1})
    run = tmp_path / "stage1"
    with pytest.raises(VQGenError, match=r"weight_average=0\.9: a weight average is kept for stage 2 \(the priors\) "
                                         r"only; train the VQ-VAE without it"):
        train_vqvae(run, TINY_DATA, tiny_train(weight_average=0.9), TINY_VQVAE)
    assert not (run / "vqvae").exists()
    # a run trained without an average cannot start one on resume
    plain = copy_stage1(tiny_run, tmp_path)
    train_prior(plain, "transformer", tiny_train(max_steps=2, save_every=2), TINY_TRANSFORMER)
    before = sorted(p.name for p in (plain / "prior").rglob("*"))
    with pytest.raises(VQGenError, match=r"cannot resume with weight_average=0\.99: the run was trained with "
                                         r"weight_average=0\.0"):
        train_prior(plain, None, {"max_steps": 4, "weight_average": 0.99}, resume=True)
    assert sorted(p.name for p in (plain / "prior").rglob("*")) == before


def test_configs_written_before_the_regularisers_load_with_them_off():
    """A prior and its training options saved in format 7 have none of the new fields: they load with each off."""
    from vqgen.core.store.configs import config_from_dict, config_to_dict

    for cfg, new in ((TransformerConfig(**GRID), ("code_dropout", "label_smoothing")),
                     (TrainConfig(), ("weight_average",))):
        old = {k: v for k, v in config_to_dict(cfg).items() if k not in new} | {"format_version": 7}
        loaded = config_from_dict(type(cfg), old)
        assert all(getattr(loaded, name) == 0.0 for name in new)
        with pytest.raises(VQGenError, match="missing fields"):
            config_from_dict(type(cfg), {**old, "format_version": 8})


def test_the_nucleus_at_one_minus_the_smoothing_keeps_exactly_the_unsmoothed_codes():
    k, smoothing = 512, 0.1
    true = torch.zeros(k)
    true[[3, 70, 200, 301, 511]] = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04])
    learned = (1 - smoothing) * true + smoothing / k  # what a prior trained with label smoothing predicts
    kept = filter_logits(learned.log()[None], top_p=1 - smoothing)[0].isfinite()
    assert kept.tolist() == (true > 0).tolist()
    assert filter_logits(learned.log()[None], top_p=1.0)[0].isfinite().all()  # the whole distribution otherwise


def test_sampling_a_label_smoothed_prior_without_a_filter_warns_in_one_line(tiny_run, tmp_path, capsys):
    from vqgen.cli import main

    run = copy_stage1(tiny_run, tmp_path)
    train_prior(run, "transformer", tiny_train(max_steps=2), {**TINY_TRANSFORMER, "label_smoothing": 0.1})
    capsys.readouterr()
    assert main(["sample", "--run", str(run), "--n", "2", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "this prior was trained with --label-smoothing 0.1, so about 10% of its draws are random codes; " \
           "--top-p 0.9 cuts them off, and `vqgen eval --samples 1000` says whether the samples then copy " \
           "training images" in " ".join(out.split())
    assert json.loads((tmp_path / "a" / "settings.json").read_text())["top_p"] is None  # drawn as asked
    for flag, value in (("--top-p", "0.9"), ("--top-k", "16")):
        assert main(["sample", "--run", str(run), "--n", "2", flag, value, "--out", str(tmp_path / flag)]) == 0
        assert "label-smoothing" not in capsys.readouterr().out
