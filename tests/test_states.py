"""Resume survives a damaged newest state: every state is checked against its manifest before it is
loaded; a damaged one is skipped with a warning naming the file; none intact is one line."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_DATA, TINY_VQVAE, load_script, tiny_train
from stage1_vqvae.train import train_vqvae
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store.layout import MANIFEST, RunLayout
from vqgen.core.store.manifest import state_damage
from vqgen.core.store.weights import state_dirs

CFG = dict(save_every=5, keep=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny stage 1 trained 15 steps with states at 5, 10 and 15. Treat as read-only."""
    run = tmp_path_factory.mktemp("states") / "run"
    train_vqvae(run, TINY_DATA, tiny_train(max_steps=15, **CFG), TINY_VQVAE, encode=False)
    return run


def state(run: Path, step: int) -> Path:
    return RunLayout(run).vqvae.state(step)


def weights_at(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(state(run, step) / "model.safetensors")


def resume(run: Path) -> None:
    train_vqvae(run, TINY_DATA, tiny_train(max_steps=15, **CFG), TINY_VQVAE, resume=True, encode=False)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": (lambda s: truncate(s / "model.safetensors"), "model.safetensors has"),
    "altered optimizer": (lambda s: flip_a_byte(s / "optimizer.bin"), "optimizer.bin does not match its sha256"),
    "missing RNG state": (lambda s: (s / "random_states_0.pkl").unlink(), "random_states_0.pkl is missing"),
    "manifest not JSON": (lambda s: (s / MANIFEST).write_text("{cut"), "manifest.json is not a readable manifest"),
    "manifest without progress": (
        lambda s: (s / MANIFEST).write_text(json.dumps({"format": 1, "files": {}})), "does not list progress.json"),
    "progress.json altered": (lambda s: (s / "progress.json").write_text('{"step": 3}'), "progress.json has"),
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_a_damaged_newest_state_is_skipped_and_the_resume_is_exact(trained, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    hurt, named = DAMAGE[damage]
    hurt(state(run, 15))
    assert named in state_damage(state(run, 15))
    capsys.readouterr()
    resume(run)  # from step 10: the steps 10 -> 15 again, rewriting the state of step 15
    out = capsys.readouterr().out
    assert f"skipped the damaged training state step-00000015: {state(run, 15)}" in " ".join(out.split())
    assert "resumed from" in out and "step-00000010" in out
    redone, original = weights_at(run, 15), weights_at(trained, 15)
    assert all(torch.equal(redone[k], original[k]) for k in original)
    assert state_damage(state(run, 15)) is None


def test_no_intact_state_is_one_line_naming_each(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for step in (5, 10, 15):
        truncate(state(run, step) / "model.safetensors")
    with pytest.raises(VQGenError, match=r"no intact training state under .* to resume from: .*step-00000015/model"
                                         r".*step-00000010/model.*step-00000005/model"):
        resume(run)
    script = load_script("train_vqvae")
    assert script.main(["--run", str(run), "--resume", "--no-encode"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no intact training state") and err.count("\n") == 0 and "Traceback" not in err


def test_states_written_before_manifests_still_load_and_are_checked(trained, tmp_path, capsys):
    """States of earlier versions have no manifest: they load, checked as far as their formats allow."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for _, folder in state_dirs(RunLayout(run).vqvae):
        (folder / MANIFEST).unlink()
    assert state_damage(state(run, 15)) is None
    flip_a_byte(state(run, 15) / "optimizer.bin")          # a torch zip: its checksums catch this
    assert "optimizer.bin fails its checksum" in state_damage(state(run, 15))
    truncate(state(run, 10) / "model.safetensors")         # safetensors: the header no longer covers the file
    assert "model.safetensors is unreadable" in state_damage(state(run, 10))
    resume(run)                                           # from step 5, the newest intact one
    out = " ".join(capsys.readouterr().out.split())
    assert "step-00000015" in out and "step-00000010" in out and "resumed from" in out
    redone, original = weights_at(run, 15), weights_at(trained, 15)
    assert all(torch.equal(redone[k], original[k]) for k in original)


def test_every_state_has_a_manifest_of_all_its_files(trained):
    for _, folder in state_dirs(RunLayout(trained).vqvae):
        listed = set(json.loads((folder / MANIFEST).read_text())["files"])
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
        assert listed == on_disk and "progress.json" in listed and "model.safetensors" in listed


def test_a_state_that_no_longer_fits_the_optimizer_is_one_line_saying_what_to_do(trained, tmp_path, monkeypatch):
    # as after an upgrade that changed the optimizer's parameter groups (one group instead of decay / no decay)
    import stage1_vqvae.train as stage1
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    monkeypatch.setattr(stage1, "make_optimizer", lambda model, cfg: torch.optim.AdamW(model.parameters()))
    before = {p: p.read_bytes() for p in RunLayout(run).vqvae.path.rglob("*") if p.is_file()}
    with pytest.raises(VQGenError) as err:
        resume(run)
    message = str(err.value)
    assert message.startswith(f"cannot load the training state {state(run, 15)}") and "\n" not in message
    assert message.endswith("finish the run with it, or start again with --overwrite")
    assert {p: p.read_bytes() for p in RunLayout(run).vqvae.path.rglob("*") if p.is_file()} == before
