"""One writer per stage folder: a second training or encode is refused, naming the one that runs; a lock
left by a dead process is taken over; readers are never refused."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import load_script, tree_hashes
from vqgen.cli import main
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store.layout import RunLayout
from vqgen.core.store.lock import StageLock

ROOT = Path(__file__).resolve().parents[1]
train_vqvae = load_script("train_vqvae")
train_prior = load_script("train_prior")
TINY = ["--hidden-channels", "16", "--res-channels", "8", "--codebook-size", "16", "--code-dim", "8",
        "--batch-size", "16", "--builtin-train-size", "96", "--builtin-test-size", "40", "--no-encode"]

HOLD = """
import sys, time
from vqgen.core.store.lock import StageLock
with StageLock(sys.argv[1], "training"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(spawn):
    """Another process holding a stage's lock, as a running training does; SIGKILLed at the end."""
    procs = []

    def hold(stage: Path) -> subprocess.Popen:
        proc = spawn([sys.executable, "-c", HOLD, str(stage / ".lock")], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert proc.stdout.readline().strip() == "held"
        procs.append(proc)
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_second_training_is_refused_naming_the_running_one(tiny_run, tmp_path, holder, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    proc = holder(run / "vqvae")
    before = tree_hashes(run)
    code = train_vqvae.main(["--run", str(run), "--overwrite", "--max-steps", "2", *TINY])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert f"{run / 'vqvae'} is in use: training by pid {proc.pid} on {socket.gethostname()} since 20" in err
    assert tree_hashes(run) == before  # --overwrite cleared nothing


def test_encode_is_refused_while_stage_1_trains_and_the_prior_while_it_trains(tiny_run, tmp_path, holder, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    holder(run / "vqvae")
    holder(run / "prior")
    assert main(["encode", "--run", str(run)]) == 2
    assert "is in use: training by pid" in capsys.readouterr().err
    assert train_prior.main(["--run", str(run), "--resume", "--max-steps", "12"]) == 2
    assert f"{run / 'prior'} is in use" in capsys.readouterr().err


def test_readers_work_while_a_training_holds_the_lock(tiny_run, tmp_path, holder):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    holder(run / "vqvae")
    holder(run / "prior")
    assert main(["sample", "--run", str(run), "--n", "2"]) == 0
    assert main(["info", "--run", str(run)]) == 0
    assert main(["eval", "--run", str(run)]) == 0


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_message(tiny_run, tmp_path, holder, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    proc = holder(run / "vqvae")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / "vqvae" / ".lock").read_text()  # the dead owner's record is still there
    assert main(["encode", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"took over {run / 'vqvae' / '.lock'}: its owner (training by pid {proc.pid}" in out
    assert "is no longer running" in out
    assert not (run / "vqvae" / ".lock").exists()  # released at the end


def test_the_lock_is_released_and_leaves_nothing_behind(tmp_path):
    stage = tmp_path / "new" / "run" / "vqvae"
    with StageLock(stage / ".lock", "training") as lock:
        assert lock.stale is None and (stage / ".lock").is_file()
        with pytest.raises(VQGenError, match=f"training by pid {os.getpid()}"):
            StageLock(stage / ".lock", "encoding").acquire()  # another open file: refused, even here
    assert not (tmp_path / "new").exists()  # folders made only for the lock go again
    with StageLock(stage / ".lock", "training"):  # and it can be taken again
        pass


def test_a_training_run_holds_the_lock_while_it_trains(spawn, tmp_path):
    """Watched from outside: while a real training runs, its stage folder has a lock naming it."""
    run = tmp_path / "run"
    proc = spawn([sys.executable, str(ROOT / "scripts" / "train_vqvae.py"), "--run", str(run), *TINY,
                  "--max-steps", "400", "--log-every", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                 text=True, cwd=ROOT)
    try:
        deadline = time.time() + 240
        while not (run / "vqvae" / "metrics.jsonl").is_file():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.05)
        with pytest.raises(VQGenError, match=f"training by pid {proc.pid} on "):
            StageLock(RunLayout(run).vqvae.lock, "encoding").acquire()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    assert proc.returncode == 143
    assert not (run / "vqvae" / ".lock").exists()
