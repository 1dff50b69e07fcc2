"""Interrupted runs lose nothing; files from elsewhere are refused; no pickle on any load path."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_DATA, TINY_VQVAE, tiny_train
from stage1_vqvae.config import VQVAEConfig
from stage1_vqvae.model import VQVAE
from stage1_vqvae.train import train_vqvae
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store.configs import FORMAT_VERSION, config_to_dict, load_config
from vqgen.core.store.layout import RunLayout
from vqgen.core.store.weights import latest_state_dir, load_model, save_model, state_dirs
from vqgen.run import Run

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_ARGS = ["--builtin-train-size", "96", "--builtin-test-size", "40", "--batch-size", "16",
               "--hidden-channels", "16", "--res-channels", "8", "--num-res-blocks", "1", "--codebook-size", "16",
               "--code-dim", "8", "--restart-after", "5", "--lr", "0.003", "--warmup-steps", "0",
               "--lr-schedule", "constant", "--log-every", "1", "--eval-every", "0", "--save-every", "5",
               "--seed", "3", "--no-encode"]


def script_command(run: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "train_vqvae.py"), "--run", str(run), *SCRIPT_ARGS, *extra]


def run_script(run: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(script_command(run, *extra), capture_output=True, text=True, timeout=300)


def last_logged_step(run: Path) -> int:
    path = run / "vqvae" / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "vqvae" / "model.safetensors"), load_file(b / "vqvae" / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def divergence(a: Path, b: Path, stage: str = "vqvae") -> str:
    """Where two runs that should match first differ: the first training record of metrics.jsonl whose
    numbers differ, as a failed test's message (a resume that drifts tells at which step it began)."""
    def records(run: Path) -> dict[int, dict]:
        lines = (run / stage / "metrics.jsonl").read_text().splitlines()
        out = {}
        for line in map(json.loads, lines):
            if line.get("split") == "train":
                out[line["step"]] = {k: v for k, v in line.items() if k not in ("time", "samples_per_s")}
        return out
    ra, rb = records(a), records(b)
    for step in sorted(set(ra) & set(rb)):
        if ra[step] != rb[step]:
            return f"training first differs at step {step}: {ra[step]} != {rb[step]}"
    return f"the weights differ, the training records agree (steps {sorted(ra)} and {sorted(rb)})"


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run(spawn, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_script(straight, "--max-steps", "30").returncode == 0
    proc = spawn(script_command(killed, "--max-steps", "30"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                 text=True)
    deadline = time.time() + 200
    while last_logged_step(killed) < 17 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    ended_by_itself = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reached = last_logged_step(killed)
    assert 17 <= reached < 30, (f"the run should have been killed mid-training, it reached step {reached}"
                                + (f"; it ended by itself: {proc.stderr.read()[-2000:]}" if ended_by_itself else ""))
    saved = latest_state_dir(RunLayout(killed).vqvae)
    saved_step = int(saved.name.split("-")[1])
    assert reached - saved_step < 5 + 1, "more than one save interval was lost"
    resumed = run_script(killed, "--max-steps", "30", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert same_weights(straight, killed), divergence(straight, killed)


DIE_DURING_SAVE = """
import os, runpy, signal, sys
import vqgen.core.training.checkpoints

real_commit = vqgen.core.training.checkpoints.commit_state_dir

def die_mid_write(stage, step, keep):
    if step == 10:  # the state folder is being written: cut a file short, then the process is killed
        tmp = stage.temporary_state(step)
        (tmp / "model.safetensors").write_bytes((tmp / "model.safetensors").read_bytes()[:100])
        os.kill(os.getpid(), signal.SIGKILL)
    return real_commit(stage, step, keep)

vqgen.core.training.checkpoints.commit_state_dir = die_mid_write
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_script(straight, "--max-steps", "15").returncode == 0
    driver = tmp_path / "die_during_save.py"
    driver.write_text(DIE_DURING_SAVE)
    cmd = [sys.executable, str(driver), str(ROOT / "scripts" / "train_vqvae.py"), "--run", str(killed),
           *SCRIPT_ARGS, "--max-steps", "15"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (killed / "vqvae" / "state" / ".tmp-step-00000010").is_dir()  # the half-written state is there
    assert [step for step, _ in state_dirs(RunLayout(killed).vqvae)] == [5]      # but never listed as a checkpoint
    resumed = run_script(killed, "--max-steps", "15", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert same_weights(straight, killed), divergence(straight, killed)
    assert not list((killed / "vqvae" / "state").glob(".tmp-*"))  # leftovers cleaned up


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(VQGenError, match=r"loss became (nan|inf) at step \d+; .*last good checkpoint is .*step-"):
        train_vqvae(run, TINY_DATA, tiny_train(max_steps=200, save_every=1, eval_every=1, learning_rate=1e12, grad_clip=0),
                    TINY_VQVAE, encode=False)
    good = load_file(run / "vqvae" / "model.safetensors")
    assert all(torch.isfinite(t.float()).all() for t in good.values())
    assert latest_state_dir(RunLayout(run).vqvae) is not None


def test_config_schema_is_enforced(tmp_path):
    cfg = VQVAEConfig(codebook_size=8, code_dim=4, hidden_channels=8, res_channels=4)
    save_model(VQVAE(cfg), cfg, tmp_path)
    path = tmp_path / "config.json"
    good = json.loads(path.read_text())

    def refused(data, pattern):
        path.write_text(json.dumps(data))
        with pytest.raises(VQGenError, match=pattern):
            load_config(VQVAEConfig, path)

    refused({**good, "colour": 3}, r"unknown fields \['colour'\]")
    refused({k: v for k, v in good.items() if k != "beta"}, r"missing fields \['beta'\]")
    refused({**good, "format_version": 99}, rf"format_version 99, this vqgen reads versions 1 to {FORMAT_VERSION}")
    refused({**good, "kind": "TransformerConfig"}, "holds a 'TransformerConfig' config, expected 'VQVAEConfig'")
    refused({**good, "codebook_size": 1}, re.escape("codebook_size must be in [2, 32768] (codes are stored as int16), got 1"))
    refused({**good, "codebook_size": 40000}, re.escape("must be in [2, 32768] (codes are stored as int16), got 40000"))
    path.write_text("{not json")
    with pytest.raises(VQGenError, match="not valid JSON"):
        load_config(VQVAEConfig, path)


def test_weights_that_do_not_match_the_config_are_refused_with_names(tmp_path):
    cfg = VQVAEConfig(codebook_size=8, code_dim=4, hidden_channels=8, res_channels=4)
    save_model(VQVAE(cfg), cfg, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["quantizer.codebook"] = torch.zeros(9, 4)
    weights["extra.weight"] = torch.zeros(1)
    del weights["decoder.net.0.bias"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(VQGenError) as err:
        load_model(VQVAE, VQVAEConfig, tmp_path)
    message = str(err.value)
    assert "decoder.net.0.bias" in message and "extra.weight" in message and "quantizer.codebook" in message
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(VQGenError, match="cannot read weights"):
        load_model(VQVAE, VQVAEConfig, tmp_path)


def test_sampling_with_a_prior_of_another_vqvae_is_refused(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    weights = load_file(run / "vqvae" / "model.safetensors")
    weights["decoder.net.0.bias"] += 1.0
    save_file(weights, run / "vqvae" / "model.safetensors")
    with pytest.raises(VQGenError, match="was trained on codes of VQ-VAE [0-9a-f]{16}, but .* holds VQ-VAE [0-9a-f]{16}"):
        Run.load(run)
    assert Run.load(run, allow_vqvae_mismatch=True).prior is not None


def test_no_pickle_on_any_load_path():
    offenders = []
    for path in [*ROOT.glob("vqgen/*.py"), *ROOT.glob("stage*/*.py"), *ROOT.glob("scripts/*.py")]:
        text = path.read_text()
        if re.search(r"^\s*(import pickle|from pickle|import dill)", text, re.M):
            offenders.append(f"{path.name}: imports pickle")
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            if "weights_only=True" not in call:
                offenders.append(f"{path.name}: {call}")
    assert not offenders, offenders


def test_config_round_trip():
    cfg = VQVAEConfig(codebook_size=8)
    data = config_to_dict(cfg)
    assert data["kind"] == "VQVAEConfig" and data["format_version"] == FORMAT_VERSION == 9


def test_a_version_1_file_without_later_fields_loads_and_a_current_one_without_them_is_refused(tmp_path):
    """Files written before `patience` existed (format 1) still load, with its default; a version-2 file
    that lacks it is refused like any missing field."""
    from vqgen.core.store.configs import load_config
    from vqgen.core.training.config import TrainConfig

    data = {k: v for k, v in config_to_dict(TrainConfig(batch_size=8)).items() if k != "patience"}
    (tmp_path / "v1.json").write_text(json.dumps({**data, "format_version": 1}))
    assert load_config(TrainConfig, tmp_path / "v1.json") == TrainConfig(batch_size=8)
    (tmp_path / "v2.json").write_text(json.dumps(data))
    with pytest.raises(VQGenError, match=r"missing fields \['patience'\]"):
        load_config(TrainConfig, tmp_path / "v2.json")


def test_written_files_get_ordinary_permissions(tmp_path):
    """Files are written to a temporary file and renamed; they must not keep mkstemp's 0600."""
    from vqgen.core.store.configs import write_json_atomic
    from vqgen.core.store.imageio import save_png

    old = os.umask(0o022)
    try:
        cfg = VQVAEConfig(codebook_size=8, code_dim=4, hidden_channels=8, res_channels=4)
        save_model(VQVAE(cfg), cfg, tmp_path)
        write_json_atomic({"a": 1}, tmp_path / "x.json")
        save_png(torch.zeros(3, 4, 4, dtype=torch.uint8), tmp_path / "x.png")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert set(modes.values()) == {0o644}, modes
