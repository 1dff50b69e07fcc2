"""The `vqgen` commands end to end on a tiny run, and their answers to bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import TINY_TRANSFORMER, tiny_train, tree_hashes
from PIL import Image
from safetensors.torch import load_file

from stage2_prior.config import SamplingConfig
from stage2_prior.train import train_prior
from vqgen.cli import main
from vqgen.core.store.codes import load_codes
from vqgen.run import Run

ROOT = Path(__file__).resolve().parents[1]


def sample_codes_of(out: Path) -> torch.Tensor:
    return load_file(out / "codes.safetensors")["codes"]


def test_sample_writes_grid_images_codes_and_settings(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["sample", "--run", str(run), "--n", "5", "--seed", "1"]) == 0
    out = run / "samples" / "0000"
    assert sorted(p.name for p in out.iterdir()) == ["codes.safetensors", "grid.png", "images", "settings.json"]
    images = sorted((out / "images").glob("*.png"))
    assert len(images) == 5
    assert Image.open(images[0]).size == (32, 32) and Image.open(images[0]).mode == "RGB"
    assert sample_codes_of(out).shape == (5, 8, 8)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["n"] == 5 and settings["seed"] == 1 and settings["processes"] == 1
    assert settings["cfg"] == 1.5  # the default guidance of a prior conditioned on classes
    assert main(["sample", "--run", str(run), "--n", "2"]) == 0
    assert (run / "samples" / "0001" / "grid.png").is_file()  # a second call never overwrites the first


def test_same_seed_same_images_other_seed_other_images(tiny_run, tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        assert main(["sample", "--run", str(tiny_run), "--n", "6", "--seed", str(seed), "--out", str(tmp_path / name)]) == 0
    a, b, c = (sample_codes_of(tmp_path / x) for x in "abc")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (tmp_path / "a/images/00003.png").read_bytes() == (tmp_path / "b/images/00003.png").read_bytes()


def test_a_sample_does_not_depend_on_batch_size(tiny_run, tmp_path):
    assert main(["sample", "--run", str(tiny_run), "--n", "6", "--out", str(tmp_path / "a")]) == 0
    assert main(["sample", "--run", str(tiny_run), "--n", "6", "--batch-size", "4", "--out", str(tmp_path / "b")]) == 0
    assert torch.equal(sample_codes_of(tmp_path / "a"), sample_codes_of(tmp_path / "b"))


@pytest.mark.slow
@pytest.mark.parametrize("prior", ["transformer", "masked"])
def test_two_process_sampling_equals_one_process(spawn, tiny_run, tiny_masked_run, tmp_path, prior):
    """Each process writes its own samples into the shared temporary folder: the same files as one process."""
    run = tiny_run if prior == "transformer" else tiny_masked_run
    assert main(["sample", "--run", str(run), "--n", "7", "--seed", "3", "--batch-size", "2",
                 "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "--", "vqgen", "sample",
           "--run", str(run), "--n", "7", "--seed", "3", "--batch-size", "2", "--out", str(tmp_path / "two")]
    proc = spawn.run(cmd, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "two/settings.json").read_text())["processes"] == 2
    assert torch.equal(sample_codes_of(tmp_path / "one"), sample_codes_of(tmp_path / "two"))
    one, two = tree_hashes(tmp_path / "one"), tree_hashes(tmp_path / "two")
    assert len([k for k in two if k.startswith("images/")]) == 7
    assert {k: v for k, v in one.items() if k != "settings.json"} == {k: v for k, v in two.items() if k != "settings.json"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_sampling_streams_batches_and_the_grid_shows_the_first_nrow_squared(tiny_run, tmp_path):
    from accelerate import Accelerator

    run = Run.load(tiny_run)
    batches = run.sample_batches(Accelerator(), 10, seed=4, batch_size=4)
    sizes = [(indices.tolist(), codes.shape, images.shape) for indices, codes, images in batches]
    assert sizes == [([0, 1, 2, 3], (4, 8, 8), (4, 3, 32, 32)), ([4, 5, 6, 7], (4, 8, 8), (4, 3, 32, 32)),
                     ([8, 9], (2, 8, 8), (2, 3, 32, 32))]
    with pytest.raises(Exception, match="top_k must be in"):
        run.sample_batches(Accelerator(), 10, sampling=SamplingConfig(top_k=9999))  # refused before drawing
    assert main(["sample", "--run", str(tiny_run), "--n", "10", "--nrow", "2", "--out", str(tmp_path / "s")]) == 0
    assert Image.open(tmp_path / "s" / "grid.png").size == (2 + 2 * 34, 2 + 2 * 34)  # 2x2: the first 4 samples
    assert len(list((tmp_path / "s" / "images").glob("*.png"))) == 10


def test_each_process_draws_a_consecutive_share_as_tensor_split_cuts_it():
    from vqgen.draws import share

    for n in range(0, 23):
        for processes in range(1, 5):
            parts = torch.arange(n).tensor_split(processes)
            assert [list(range(*share(n, processes, i))) for i in range(processes)] == [p.tolist() for p in parts]


def test_labels_are_honoured(tiny_run, tmp_path):
    assert main(["sample", "--run", str(tiny_run), "--n", "4", "--label", "circle", "--out", str(tmp_path / "c")]) == 0
    assert main(["sample", "--run", str(tiny_run), "--n", "4", "--label", "5", "--out", str(tmp_path / "d")]) == 0
    assert json.loads((tmp_path / "c/settings.json").read_text())["labels"] == [0, 0, 0, 0]
    assert json.loads((tmp_path / "d/settings.json").read_text())["labels"] == [5, 5, 5, 5]
    assert main(["sample", "--run", str(tiny_run), "--n", "7", "--out", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e/settings.json").read_text())["labels"] == [0, 1, 2, 3, 4, 5, 0]
    assert main(["sample", "--run", str(tiny_run), "--n", "2", "--unconditional", "--out", str(tmp_path / "f")]) == 0
    assert json.loads((tmp_path / "f/settings.json").read_text())["labels"] is None
    run = Run.load(tiny_run)
    with torch.no_grad():  # the label reaches the prior: its first-code distribution changes
        state = run.prior.start(torch.tensor([0, 5]), 2)
        logits, _ = run.prior.step(state, torch.zeros(2, 64, dtype=torch.long), 0)
    assert not torch.allclose(logits[0], logits[1])


def test_complete_keeps_the_given_rows(tiny_run):
    run = Run.load(tiny_run)
    splits, _ = load_codes(tiny_run / "codes")
    codes, labels = splits["test"].codes[:3], splits["test"].labels[:3]
    completed, images = run.complete(codes, keep_rows=5, labels=labels, seed=0)
    assert torch.equal(completed[:, :5], codes[:, :5])
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8


def test_other_commands_run(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = load_codes(run / "codes")[0]["test"].codes
    assert main(["reconstruct", "--run", str(run), "--n", "4"]) == 0
    assert Image.open(run / "reconstructions.png").size[0] > 4 * 32
    assert main(["complete", "--run", str(run), "--n", "3", "--keep-rows", "4"]) == 0
    assert (run / "completions.png").is_file()
    assert main(["encode", "--run", str(run)]) == 0
    assert torch.equal(load_codes(run / "codes")[0]["test"].codes, before)
    assert main(["info", "--run", str(run)]) == 0
    assert main(["eval", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert "bits_per_code" in out and "psnr" in out and "vqvae" in out


BAD_INPUTS = [
    (["sample", "--run", "{missing}"], "run not found"),
    (["sample", "--run", "{no_prior}"], "no trained prior"),
    (["sample", "--n", "0"], "--n must be >= 1, got 0"),
    (["sample", "--n", "-3"], "--n must be >= 1, got -3"),
    # refused for the disk before anything is drawn, and nothing on the way holds n of anything (8 TB of indices)
    (["sample", "--n", "1000000000000"], "--n 1000000000000 needs about"),
    (["sample", "--label", "hexagon"], "unknown label 'hexagon'"),
    (["sample", "--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    (["sample", "--top-p", "0"], "top_p must be in (0, 1], got 0"),
    (["sample", "--top-k", "0"], "top_k"),
    (["sample", "--temperature", "0"], "temperature"),
    (["sample", "--n", "abc"], "invalid int value: 'abc'"),
    (["sample", "--out", "{run}/vqvae/config.json/out"], "cannot write to"),
    (["reconstruct", "--out", "/proc/vqgen/x.png"], "cannot write to /proc/vqgen"),
    (["complete", "--keep-rows", "99"], "--keep-rows must be in [0, 8]"),
    (["reconstruct", "--n", "0"], "--n must be >= 1, got 0"),
    (["info", "--run", "{missing}"], "is not a vqgen run"),
    (["eval", "--run", "{missing}"], "run not found"),
    (["encode", "--run", "{missing}"], "run not found"),
    (["encode", "--data", "/no/such/folder"], "/no/such/folder"),
    (["eval", "--samples", "1"], "--samples must be 0 (none) or at least 6 (the k-NN measures need more than 5), got 1"),
    (["eval", "--samples", "4"], "--samples must be 0 (none) or at least 6"),
    (["eval", "--samples", "-5"], "--samples must be 0 (none) or at least 6 (the k-NN measures need more than 5), got -5"),
    (["eval", "--samples", "8", "--seeds", "0"], "--seeds must be >= 1, got 0"),
    (["eval", "--seeds", "3"], "--seeds scores samples: give --samples N as well"),
    (["eval", "--sweep", "cfg=1,2"], "--sweep scores samples: give --samples N as well"),
    (["eval", "--samples", "8", "--sweep", "colour=1,2"],
     "unknown setting 'colour'; expected one of temperature, top-k, top-p, cfg, cfg-schedule, steps"),
    (["eval", "--samples", "8", "--sweep", "cfg=1,x"], "--sweep 'cfg=1,x': cfg takes float values, got '1,x'"),
    (["eval", "--samples", "8", "--sweep", "cfg"], "expected SETTING=V1,V2"),
    (["eval", "--samples", "8", "--sweep", "cfg=1", "cfg=2"], "names a setting twice"),
    (["eval", "--samples", "8", "--sweep", "temperature=1,0"], "temperature must be > 0, got 0.0"),
    (["eval", "--samples", "8", "--sweep", "top-k=5,99"], "top_k must be in [1, 16], got 99"),
    (["eval", "--samples", "8", "--judge-steps", "0"], "--judge-steps must be >= 1, got 0"),
    (["eval", "--inception"], "give --samples N as well"),
    (["eval", "--samples", "8", "--inception"], "needs torch-fidelity"),
    (["eval", "--run", "{no_prior}", "--samples", "8"], "no trained prior"),
    (["sample", "--run", "{unconditional}", "--label", "circle"], "labels given but the prior"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_changes_nothing(tiny_run, tmp_path, capsys, argv, message):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    no_prior = tmp_path / "no_prior"
    shutil.copytree(tiny_run / "vqvae", no_prior / "vqvae")
    argv = [a.format(missing=tmp_path / "missing", no_prior=no_prior, run=run,
                     unconditional=unconditional_run(tiny_run, tmp_path)) for a in argv]
    if "--run" not in argv:
        argv += ["--run", str(run)]
    before = tree_hashes(run)
    with pytest.raises(SystemExit) if "abc" in argv else _no_raise():
        code = main(argv)
        assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error:"), err
    assert message in err
    assert "Traceback" not in err
    assert tree_hashes(run) == before


def unconditional_run(tiny_run: Path, tmp_path: Path) -> Path:
    """A copy of the tiny run whose prior ignores the labels (what an unlabelled folder gives)."""
    run = tmp_path / "unconditional"
    if not run.exists():
        shutil.copytree(tiny_run, run)
        train_prior(run, "transformer", tiny_train(max_steps=2), TINY_TRANSFORMER, labels="no", overwrite=True)
    return run


def test_eval_seeds_give_a_spread_and_a_sweep_scores_every_setting_with_the_same_seeds(tiny_run, tmp_path, capsys,
                                                                                      monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)  # captured output is a log: no edge, every number in full
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["eval", "--run", str(run), "--samples", "8", "--judge-steps", "10", "--seed", "4"]) == 0
    one = json.loads((run / "evaluations.jsonl").read_text().splitlines()[-1])
    assert main(["eval", "--run", str(run), "--samples", "8", "--seeds", "2", "--seed", "4"]) == 0
    two = json.loads((run / "evaluations.jsonl").read_text().splitlines()[-1])
    assert two["seeds"] == [4, 5] and two["per_seed"][0]["samples"] == one["samples"]  # seed 4 reproduces exactly
    assert two["samples"]["fid"] == pytest.approx((two["per_seed"][0]["samples"]["fid"]
                                                   + two["per_seed"][1]["samples"]["fid"]) / 2)
    assert two["spread"]["samples"]["fid"] > 0 and "± " in capsys.readouterr().out
    assert main(["eval", "--run", str(run), "--samples", "8", "--seeds", "2", "--sweep", "cfg=1,3",
                 "temperature=1,0.5"]) == 0
    records = [json.loads(line) for line in (run / "evaluations.jsonl").read_text().splitlines()[-4:]]
    assert [(r["cfg_scale"], r["temperature"]) for r in records] == [(1, 1), (1, 0.5), (3, 1), (3, 0.5)]
    assert len({r["sweep_id"] for r in records}) == 1 and [r["baseline"] for r in records] == [None, 0, 0, 0]
    out = " ".join(capsys.readouterr().out.split())
    assert "sweep over temperature, cfg: 2 seed(s) each" in out and "temperature 0.5, cfg 3.0" in out
    for r in records:  # the table's cells whole, none cut short to fit 80 columns ("0.48…")
        fid, kid = r["samples"]["fid"], r["samples"]["kid"]
        assert f"{fid:.4g} ± {r['spread']['samples']['fid']:.2g}" in out and f"{kid:.4g} ± " in out
    assert "…" not in out


def test_eval_trains_its_judge_for_the_steps_stage_1_uses_unless_told(tiny_run, tmp_path, monkeypatch):
    """One number for both (`quality.JUDGE_STEPS`, 600; 20 under the tests' conftest), so a test that shortens
    it shortens `vqgen eval`'s judge too; `--judge-steps` overrides it."""
    from vqgen.core.evaluate import quality

    monkeypatch.setattr(quality, "JUDGE_STEPS", 3)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    judge_config = run / "judge" / "config.json"
    assert main(["eval", "--run", str(run), "--samples", "8"]) == 0
    assert json.loads(judge_config.read_text())["steps"] == 3
    assert main(["eval", "--run", str(run), "--samples", "8", "--retrain-judge", "--judge-steps", "4"]) == 0
    assert json.loads(judge_config.read_text())["steps"] == 4


def test_eval_scores_samples_beside_real_images(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["eval", "--run", str(run), "--samples", "12", "--judge-steps", "20"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "12 samples against the 40 test images, beside 12 real training images and their reconstructions" in out
    assert "reconstructed: what samples would reach with a perfect prior" in out
    for measure in ("fid", "class_accuracy", "coverage"):
        assert measure in out
    record = json.loads((run / "evaluations.jsonl").read_text().splitlines()[-1])
    assert record["samples"]["n_samples"] == 12 and record["real"]["fid"] >= 0
    assert record["reconstructed"]["n_samples"] == 12 and record["reconstructed"]["fid"] != record["real"]["fid"]
    for column in ("samples", "reconstructed"):  # real images were never codes: no round trip for them
        assert 0 <= record[column]["code_round_trip"] <= 1
    assert "code_round_trip" not in record["real"]
    assert (run / "judge" / "model.safetensors").is_file()  # trained once, then reused
    assert main(["eval", "--run", str(unconditional_run(tiny_run, tmp_path)), "--samples", "6",
                 "--judge-steps", "5"]) == 0
    assert "class_accuracy" not in capsys.readouterr().out  # nothing to check a class against


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_bad_input_from_a_real_process_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vqgen", "sample", "--run", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert f"run not found: {tmp_path / 'none'}" in proc.stderr


def test_sampling_under_bf16_autocast(tiny_run, tmp_path):
    assert main(["sample", "--run", str(tiny_run), "--n", "3", "--mixed-precision", "bf16",
                 "--out", str(tmp_path / "bf16")]) == 0
    codes = sample_codes_of(tmp_path / "bf16")
    assert codes.shape == (3, 8, 8) and int(codes.min()) >= 0 and int(codes.max()) < 16


def test_eval_draws_its_samples_under_bf16_autocast_and_records_the_precision(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["eval", "--run", str(run), "--samples", "8", "--judge-steps", "10"]) == 0
    AcceleratorState._reset_state(reset_partial_state=True)  # a second command, as in a new process
    assert main(["eval", "--run", str(run), "--samples", "8", "--mixed-precision", "bf16"]) == 0
    full, bf16 = [json.loads(line) for line in (run / "evaluations.jsonl").read_text().splitlines()[-2:]]
    assert (full["mixed_precision"], bf16["mixed_precision"]) == ("no", "bf16")
    assert bf16["real"] == full["real"]  # the judge's view of real images does not depend on the sampling precision
    assert bf16["reconstructed"] == full["reconstructed"]
    assert 0 <= bf16["samples"]["fid"] < float("inf")


def test_sample_folders_and_files_are_readable_by_others(tiny_run, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["sample", "--run", str(tiny_run), "--n", "2", "--out", str(tmp_path / "s")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "s").rglob("*") if p.is_file()} == {0o644}
