"""Held-out-driven training: the best weights are kept, training stops when the test metric stalls,
and memorising the training set is called out."""

from __future__ import annotations

import json

import torch

from conftest import TINY_TRANSFORMER, tiny_train
from stage2_prior.contract import grid_nll
from stage2_prior.registry import load_prior
from stage2_prior.train import train_prior
from vqgen.core.evaluate.measures import bits
from vqgen.core.store.codes import load_codes
from vqgen.core.store.layout import RunLayout
from vqgen.core.training.best import HeldOut


def test_held_out_tracks_the_best_stops_and_warns():
    held = HeldOut("bits_per_code", "bits_per_code", patience=3)
    assert held.update(10, {"bits_per_code": 5.0}, {"bits_per_code": 5.5}).improved
    assert held.update(20, {"bits_per_code": 4.0}, {"bits_per_code": 4.5}).improved
    v = held.update(30, {"bits_per_code": 4.2}, {"bits_per_code": 3.9})
    assert not v.improved and not v.stop and v.warning is None
    v = held.update(40, {"bits_per_code": 4.4}, {"bits_per_code": 3.1})
    assert v.warning and "4 at step 20" in v.warning and "4.4 at step 40" in v.warning and "4.5 -> 3.1" in v.warning
    assert held.update(50, {"bits_per_code": 4.6}, {"bits_per_code": 3.0}).stop
    assert held.record() == {"best_step": 20, "best_bits_per_code": 4.0}
    resumed = HeldOut("bits_per_code", "bits_per_code", patience=3, **held.state())
    assert resumed.best_step == 20 and resumed.evals_since_best == 3


def test_no_warning_when_training_also_got_worse():
    held = HeldOut("mse", "recon_mse", patience=0)
    held.update(1, {"mse": 1.0}, {"recon_mse": 1.0})
    held.update(2, {"mse": 1.1}, {"recon_mse": 1.2})
    v = held.update(3, {"mse": 1.2}, {"recon_mse": 1.3})
    assert v.warning is None and not v.stop  # patience 0: never stops


def test_an_overfitting_prior_keeps_its_best_weights_and_stops_early(tiny_run, tmp_path, capsys):
    """A prior with a high learning rate on 96 grids memorises them: the test NLL turns up, training
    stops `patience` evaluations later, and the weights on disk are those of the best evaluation."""
    run = tmp_path / "run"
    metrics = train_prior(run, "transformer", tiny_train(max_steps=400, eval_every=10, log_every=10, patience=3,
                                                          learning_rate=1e-2), TINY_TRANSFORMER,
                          codes_dir=tiny_run / "codes", allow_vqvae_mismatch=True)
    out = capsys.readouterr().out
    records = [json.loads(x) for x in RunLayout(run).prior.metrics.read_text().splitlines()]
    tests = [r for r in records if r["split"] == "test"]
    best = min(tests, key=lambda r: r["bits_per_code"])
    assert tests[-1]["best_step"] == best["step"] == metrics["best_step"]
    assert tests[-1]["step"] == best["step"] + 3 * 10 < 400, "stopped 3 evaluations after the best"
    assert "stopped early" in out and "memorising its training set" in out
    prior, _ = load_prior(RunLayout(run).prior)  # the weights later commands use: the best ones
    test = load_codes(tiny_run / "codes")[0]["test"]
    with torch.no_grad():
        nll = bits(grid_nll(prior, test.codes, test.labels).mean().item()) / test.codes[0].numel()
    assert abs(nll - best["bits_per_code"]) < 1e-4
    progress = json.loads((sorted(RunLayout(run).prior.states.iterdir())[-1] / "progress.json").read_text())
    assert progress["step"] == tests[-1]["step"] and progress["held_out"]["best_step"] == best["step"]
    from vqgen.cli import main

    assert main(["info", "--run", str(run)]) == 0
    table = " ".join(capsys.readouterr().out.split())
    assert f"best step {best['step']}" in table and f"latest step {tests[-1]['step']}" in table
