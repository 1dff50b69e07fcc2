"""Stage 1's sharpness evaluation: the test reconstructions' in-domain FID in the run's judge, the best-weights
rule that keeps the lowest FID within a PSNR slack of the best, and the line a failed adversarial phase gets."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_DATA, TINY_VQVAE, tiny_train
from safetensors.torch import load_file

from stage1_vqvae.config import GANConfig
from stage1_vqvae.train import adversarial_verdict, train_vqvae
from vqgen.core.evaluate.quality import load_judge
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store.configs import config_from_dict, config_to_dict
from vqgen.core.training.best import HeldOut

SHARP = ("recon_fid", "recon_mse")


def test_the_sharper_checkpoint_wins_when_the_mse_ties():
    plain = HeldOut("mse", "recon_mse")
    assert plain.update(1, {"mse": 0.01, "psnr": 20.0, "recon_fid": 5.0}, {}).improved
    assert not plain.update(2, {"mse": 0.01, "psnr": 20.0, "recon_fid": 2.0}, {}).improved  # MSE alone: a tie
    sharp = HeldOut(*SHARP, within=("psnr", 1.0))
    assert sharp.update(1, {"psnr": 20.0, "recon_fid": 5.0}, {}).improved
    assert sharp.update(2, {"psnr": 20.0, "recon_fid": 2.0}, {}).improved
    assert not sharp.update(3, {"psnr": 20.0, "recon_fid": 2.5}, {}).improved


def test_a_lower_fid_is_kept_only_within_the_slack_of_the_best_psnr():
    held = HeldOut(*SHARP, within=("psnr", 1.0))
    decisions = [held.update(step, {"psnr": p, "recon_fid": f}, {}).improved for step, p, f in [
        (1, 20.0, 5.0),   # the first
        (2, 19.5, 3.0),   # 0.5 dB lost for a lower FID: kept
        (3, 18.9, 1.0),   # 1.1 dB below the best PSNR: never kept, however sharp
        (4, 21.2, 4.0),   # the best PSNR rose past the kept 19.5 + 1: the kept one is left behind, this replaces it
        (5, 20.5, 3.5),   # within 1 dB of 21.2 and sharper than 4.0
        (6, 20.1, 3.0),   # 1.1 dB below 21.2
    ]]
    assert decisions == [True, True, False, True, True, False]
    stalled = HeldOut(*SHARP, within=("psnr", 1.0))
    warnings = [stalled.update(step, {"psnr": 20.0 + step / 10, "recon_fid": 1.0 + step},
                               {"recon_mse": 1 / step}).warning for step in range(1, 5)]
    assert warnings == [None] * 4  # a blurrier reconstruction as the training MSE falls is no sign of memorising
    assert held.record() == {"best_step": 5, "best_recon_fid": 3.5}
    assert held.evals_since_best == 1
    resumed = HeldOut(*SHARP, within=("psnr", 1.0), **json.loads(json.dumps(held.state())))
    assert (resumed.top, resumed.best_top) == (21.2, 20.5)
    assert resumed.update(7, {"psnr": 20.3, "recon_fid": 3.4}, {}).improved
    assert not resumed.update(8, {"psnr": 20.3, "recon_fid": 3.45}, {}).improved


def test_early_stopping_under_the_slack_rule_waits_for_both_measures_to_stall():
    """A noisy FID that stalls while the PSNR still rises is progress (it stopped runs before their adversarial
    phase began); `patience` evaluations with neither a kept evaluation nor a new best PSNR stop the run."""
    held = HeldOut(*SHARP, patience=2, within=("psnr", 1.0))
    verdicts = [held.update(step, {"psnr": p, "recon_fid": f}, {}) for step, p, f in [
        (1, 20.0, 2.0),   # kept
        (2, 20.3, 2.5),   # blurrier, PSNR up 0.3 dB: progress, not kept
        (3, 20.6, 2.6),   # again
        (4, 20.8, 2.7),   # again: three evaluations without a kept one, and no stop
        (5, 20.7, 2.8),   # neither improves: 1
        (6, 20.5, 2.9),   # 2 = patience: stop
    ]]
    assert [v.improved for v in verdicts] == [True, False, False, False, False, False]
    assert [v.stop for v in verdicts] == [False] * 5 + [True]
    assert held.stalled() == "neither test recon_fid nor psnr has improved for 2 evaluations"
    plain = HeldOut("mse", "recon_mse", patience=2)
    assert [plain.update(s, {"mse": m}, {}).stop for s, m in [(1, 1.0), (2, 1.1), (3, 1.2)]] == [False, False, True]
    assert plain.stalled() == "test mse has not improved for 2 evaluations"


def test_a_state_saved_before_the_rule_existed_still_resumes():
    old = {"best_step": 4, "best_value": 0.01, "best_train": 0.02, "evals_since_best": 0}
    held = HeldOut("mse", "recon_mse", **old)
    assert held.top is None and not held.update(5, {"mse": 0.02}, {}).improved


def records(*rows):
    tests = [{"split": "test", "step": s, "psnr": p, "recon_fid": f} for s, p, f in rows]
    return tests + [{"split": "train", "step": 1}]


def test_the_adversarial_phase_that_did_not_help_is_named_in_one_line():
    gan = GANConfig(adversarial_weight=0.1, adversarial_start=200)
    worse = adversarial_verdict(records((100, 20.0, 4.0), (200, 21.0, 3.0), (300, 20.9, 3.5), (400, 21.1, 3.2)),
                                gan, best_step=200)
    assert worse == ("the adversarial phase (from step 200) did not beat step 200's reconstructions (FID 3, "
                     "21.00 dB): its lowest reconstruction FID was 3.2 (step 400); the run keeps step 200's weights")
    lossy = adversarial_verdict(records((100, 20.0, 4.0), (200, 21.0, 3.0), (300, 19.5, 1.0)), gan, best_step=200)
    assert "its lowest reconstruction FID (1 at step 300) cost 1.50 dB of test PSNR, more than psnr_slack 1" in lossy
    assert "\n" not in worse + lossy
    assert adversarial_verdict(records((200, 21.0, 3.0), (300, 20.8, 2.0)), gan, best_step=300) is None
    assert adversarial_verdict(records((100, 20.0, 4.0), (200, 21.0, 3.0)), gan, best_step=200) is None  # not started


def test_stage_1_scores_sharpness_and_keeps_weights_by_it(tmp_path):
    run = tmp_path / "run"
    metrics = train_vqvae(run, TINY_DATA, tiny_train(max_steps=6, eval_every=2), TINY_VQVAE, encode=False,
                          gan=dict(sharpness="on", psnr_slack=0.5))
    tests = [json.loads(line) for line in (run / "vqvae/metrics.jsonl").read_text().splitlines()]
    tests = [r for r in tests if r["split"] == "test"]
    assert [r["step"] for r in tests] == [2, 4, 6] and all(r["recon_fid"] >= 0 for r in tests)
    replay = HeldOut(*SHARP, within=("psnr", 0.5))
    for r in tests:
        replay.update(r["step"], r, {})
    assert metrics["best_step"] == replay.best_step and metrics["best_recon_fid"] == replay.best_value
    assert tests[-1]["best_step"] == replay.best_step
    judge = load_judge(run / "judge")  # the run's judge, which `vqgen eval` then uses
    assert judge.config.image_height == 32
    saved = json.loads((run / "vqvae/gan_config.json").read_text())
    assert saved["sharpness"] == "on" and saved["psnr_slack"] == 0.5 and saved["adversarial_weight"] == 0


def test_sharpness_is_on_with_a_term_and_off_without(tmp_path):
    assert GANConfig(adversarial_weight=0.1).judged and GANConfig(perceptual_weight=0.1).judged
    assert not GANConfig().judged and not GANConfig(adversarial_weight=0.1, sharpness="off").judged
    plain = tmp_path / "plain"
    train_vqvae(plain, TINY_DATA, tiny_train(max_steps=2), TINY_VQVAE, encode=False)
    last = [json.loads(line) for line in (plain / "vqvae/metrics.jsonl").read_text().splitlines()][-1]
    assert "recon_fid" not in last and "best_mse" in last and not (plain / "judge").exists()


def test_resume_with_sharpness_continues_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    gan = dict(sharpness="on")
    train_vqvae(straight, TINY_DATA, tiny_train(max_steps=4, eval_every=1, save_every=2), TINY_VQVAE,
                encode=False, gan=gan)
    train_vqvae(split, TINY_DATA, tiny_train(max_steps=2, eval_every=1, save_every=2), TINY_VQVAE,
                encode=False, gan=gan)
    train_vqvae(split, TINY_DATA, tiny_train(max_steps=4, eval_every=1, save_every=2), resume=True, encode=False)
    def rows(run):
        lines = (run / "vqvae/metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["recon_fid"], r["best_step"]) for r in map(json.loads, lines) if r["split"] == "test"]

    assert rows(split) == rows(straight)
    a, b = (load_file(run / "vqvae/model.safetensors") for run in (straight, split))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sharpness_options_are_checked_in_one_line(tmp_path):
    for kw, message in [(dict(sharpness="yes"), "sharpness must be one of auto, on, off, got 'yes'"),
                        (dict(psnr_slack=-1.0), "psnr_slack must be a finite number >= 0, got -1.0")]:
        with pytest.raises(VQGenError, match=message):
            GANConfig(**kw)
    old = {k: v for k, v in config_to_dict(GANConfig(adversarial_weight=0.1)).items()
           if k not in ("sharpness", "psnr_slack")}
    old["format_version"] = 6  # a run trained before the rule: its best weights followed the MSE
    assert config_from_dict(GANConfig, old).sharpness == "off"
    plain = tmp_path / "plain"
    train_vqvae(plain, TINY_DATA, tiny_train(max_steps=2, save_every=2), TINY_VQVAE, encode=False)
    with pytest.raises(VQGenError, match="trained without sharpness"):
        train_vqvae(plain, TINY_DATA, tiny_train(max_steps=4), resume=True, encode=False, gan=dict(sharpness="on"))
    lonely = tmp_path / "lonely"
    with pytest.raises(VQGenError, match="sharpness needs a test split of at least 2 images"):
        train_vqvae(lonely, TINY_DATA.__class__(builtin_train_size=96, builtin_test_size=1), tiny_train(max_steps=2),
                    TINY_VQVAE, encode=False, gan=dict(sharpness="on"))
    assert not (lonely / "vqvae/config.json").exists() and not (lonely / "judge").exists()


def test_the_benchmark_scores_kept_weights_as_the_run_did(tmp_path, capsys):
    from conftest import load_script

    bench = load_script("benchmarks/adversarial")
    sharp, plain = tmp_path / "sharp", tmp_path / "plain"
    metrics = train_vqvae(sharp, TINY_DATA, tiny_train(max_steps=4, eval_every=2), TINY_VQVAE, encode=False,
                          gan=dict(sharpness="on"))
    train_vqvae(plain, TINY_DATA, tiny_train(max_steps=4, eval_every=2), TINY_VQVAE, encode=False)
    out = tmp_path / "scores.json"
    assert bench.main(["score", str(sharp), str(plain), "--batch-size", "7", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["recon_fid"] == pytest.approx(metrics["best_recon_fid"], rel=1e-6)  # the same judge and images
    assert rows[0]["psnr"] == pytest.approx(metrics["psnr"], rel=1e-5) and rows[1]["recon_fid"] > 0
    assert rows[1]["steps"] == 4 and rows[0]["train_seconds"] > 0
    assert "| sharp | 0 | - | 4 (" in capsys.readouterr().out
    assert bench.main(["score", str(tmp_path / "none")]) == 2


def test_the_benchmark_writes_photo_crops_with_whole_photos_held_out(tmp_path):
    pytest.importorskip("skimage")
    from conftest import load_script

    from vqgen.core.data.images import load_image_data

    bench = load_script("benchmarks/adversarial")
    folder = tmp_path / "photos"
    assert bench.main(["photos", str(folder), "--size", "16", "--train-crops", "6", "--test-crops", "3"]) == 0
    data = load_image_data(TINY_DATA.__class__(source=str(folder)))
    assert (len(data.train), len(data.test), data.channels, data.height, data.num_classes) == (6, 6, 3, 16, 0)
    before = sorted(p.stat().st_mtime_ns for p in folder.rglob("*.parquet"))
    assert bench.main(["photos", str(folder), "--size", "16"]) == 2  # refused: nothing overwritten
    assert sorted(p.stat().st_mtime_ns for p in folder.rglob("*.parquet")) == before
