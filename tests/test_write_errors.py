"""A full disk while writing weights, states, codes or samples: one line naming the path and the reason,
the earlier files intact, no temporary files left.

Each case runs twice: on a real 3 MB tmpfs filled to the brim (when the tests run as root and can
mount one, as in CI), and with ENOSPC injected into the writer (everywhere).
"""

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import TINY_DATA, TINY_VQVAE, load_script, tiny_train, tree_hashes
from stage1_vqvae.config import VQVAEConfig
from stage1_vqvae.model import VQVAE
from stage1_vqvae.train import train_vqvae
from vqgen.cli import main
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store.layout import RunLayout
from vqgen.core.store.manifest import state_damage
from vqgen.core.store.weights import save_model, state_dirs

FULL = "No space left on device"


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(params=["tmpfs", "injected"])
def disk(request, tmp_path, monkeypatch):
    """(folder to work in, fill(targets)): `fill` makes the next write to those targets fail with ENOSPC."""
    if request.param == "injected":
        folder = tmp_path / "disk"
        folder.mkdir()

        def inject(targets: list[tuple[object, str]], leave: int = 0) -> None:
            for owner, name in targets:
                monkeypatch.setattr(owner, name, enospc)

        yield folder, inject
        return
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")

    def fill(targets: list[tuple[object, str]], leave: int = 16 * 1024) -> None:
        filler = folder / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            while True:
                os.write(fd, bytes(1 << 16))
        except OSError:
            pass
        finally:
            os.close(fd)
        os.truncate(filler, max(0, filler.stat().st_size - leave))

    try:
        yield folder, fill
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def no_temporaries(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob(".*") if p.name not in (".lock",) and not p.name.startswith(".vqgen")]


def test_a_full_disk_while_saving_a_state_keeps_the_previous_one(disk, capsys):
    import vqgen.core.training.checkpoints

    folder, fill = disk
    run = folder / "run"
    train_vqvae(run, TINY_DATA, tiny_train(max_steps=5, save_every=5), TINY_VQVAE, encode=False)
    weights = (run / "vqvae" / "model.safetensors").read_bytes()
    fill([(vqgen.core.training.checkpoints, "write_manifest")])
    script = load_script("train_vqvae")
    code = script.main(["--run", str(run), "--resume", "--max-steps", "15", "--save-every", "5", "--no-encode"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    assert f"cannot write {run / 'vqvae' / 'state' / '.tmp-step-00000010'}" in err and FULL in err
    stage = RunLayout(run).vqvae
    assert [step for step, _ in state_dirs(stage)] == [5] and state_damage(stage.state(5)) is None
    assert (run / "vqvae" / "model.safetensors").read_bytes() == weights
    assert no_temporaries(run) == []


def test_a_full_disk_while_exporting_weights_keeps_the_previous_ones(disk):
    import vqgen.core.store.weights

    folder, fill = disk
    cfg = VQVAEConfig(codebook_size=8, code_dim=4, hidden_channels=8, res_channels=4)
    model = VQVAE(cfg)
    save_model(model, cfg, folder / "w")
    before = tree_hashes(folder / "w")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    fill([(vqgen.core.store.weights, "save_file")], leave=4096)
    with pytest.raises(VQGenError, match=f"cannot write {folder / 'w' / 'model.safetensors'}: {FULL}"):
        save_model(model, cfg, folder / "w")
    assert tree_hashes(folder / "w") == before  # the old weights and config, and no temporary file


def test_a_full_disk_while_encoding_keeps_the_previous_codes(disk, tiny_run, capsys):
    import safetensors.torch

    folder, fill = disk
    run = folder / "run"
    for part in ("vqvae/config.json", "vqvae/model.safetensors", "vqvae/data_config.json", "codes"):
        (run / part).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (tiny_run / part).is_dir() else shutil.copy)(tiny_run / part, run / part)
    before = tree_hashes(run)
    fill([(safetensors.torch, "save_file")])  # the codes' shards
    assert main(["encode", "--run", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"cannot write {run / '.codes.tmp'}" in err and FULL in err, err
    assert tree_hashes(run) == before and no_temporaries(run) == []


def test_a_full_disk_while_sampling_leaves_no_sample_folder(disk, tiny_run, capsys, monkeypatch):
    import vqgen.core.store.sample_set

    folder, fill = disk
    run = folder / "run"
    for part in ("vqvae", "prior/config.json", "prior/model.safetensors", "prior/source.json"):
        (run / part).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (tiny_run / part).is_dir() else shutil.copy)(tiny_run / part, run / part)
    shutil.rmtree(run / "vqvae" / "state")
    monkeypatch.setattr(vqgen.core.store.sample_set, "disk_needed", lambda *a: (0, 0))  # past the up-front check
    fill([(vqgen.core.store.sample_set, "to_pil")])
    assert main(["sample", "--run", str(run), "--n", "300", "--batch-size", "50"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot write" in err and FULL in err, err
    assert list((run / "samples").iterdir()) == []


def test_a_sample_set_the_disk_cannot_hold_is_refused_before_sampling(tiny_run, tmp_path, capsys, monkeypatch):
    import vqgen.core.store.sample_set

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    free = 5_000_000
    monkeypatch.setattr(vqgen.core.store.sample_set.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 0, free))
    before = tree_hashes(run)
    assert main(["sample", "--run", str(run), "--n", "20000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--n 20000 needs about" in err and "per image) but only 5.0 MB is free" in err
    assert tree_hashes(run) == before and not (run / "samples").exists()
    assert main(["sample", "--run", str(run), "--n", "20", "--out", str(tmp_path / "fits")]) == 0
