"""The decoder-tuning benchmark (scripts/benchmarks/decoder_tune.py): only the decoder learns, from the prior's
draws."""

import json

import torch
from safetensors.torch import load_file

from conftest import load_script

tune = load_script("benchmarks/decoder_tune")


def test_the_prior_redraws_each_code_given_the_true_codes_before_it(tiny_run):
    from stage2_prior.registry import load_prior
    from vqgen.core.store.codes import load_codes
    from vqgen.core.store.layout import RunLayout

    prior, _ = load_prior(RunLayout(tiny_run).prior)
    splits, _ = load_codes(RunLayout(tiny_run).codes)
    codes, labels = splits["train"].codes[:16].long(), splits["train"].labels[:16]
    torch.manual_seed(0)
    drawn = tune.prior_draws(prior, codes, labels, cfg=1.5)
    assert drawn.shape == codes.shape and drawn.dtype == torch.long
    assert 0 < (drawn != codes).float().mean() < 1  # some codes redrawn, some the same
    later = codes.clone()
    later[:, -1] = (later[:, -1] + 1) % prior.config.codebook_size  # the last row changed: no place before it sees it
    torch.manual_seed(0)
    again = tune.prior_draws(prior, later, labels, cfg=1.5)
    assert torch.equal(again[:, :-1], drawn[:, :-1])


def test_tuning_changes_the_decoder_alone(tiny_run, tmp_path):
    out = tmp_path / "tuned"
    tune.main(["--run", str(tiny_run), "--out", str(out), "--steps", "2", "--batch-size", "8"])
    before = load_file(tiny_run / "vqvae" / "model.safetensors")
    after = load_file(out / "vqvae" / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed and all(key.startswith("decoder.") for key in changed)  # encoder, codebook: the prior's codes
    assert (out / "prior" / "model.safetensors").read_bytes() == (tiny_run / "prior" / "model.safetensors").read_bytes()
    assert [r["step"] for r in json.loads((out / "decoder_tune.json").read_text())["log"]] == [1]
