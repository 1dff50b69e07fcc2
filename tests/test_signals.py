"""Real SIGTERM and SIGINT sent to real training, sampling and encoding processes.

Each signal arrives at a set point: a driver script wraps one function of the run so that, at a
given step (or batch), it creates a marker file and waits there until the test's signal has arrived.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import tree_hashes
from test_reliability import ROOT, SCRIPT_ARGS, divergence, same_weights
from vqgen.core.runtime.signals import STOP_CHECK_EVERY, StopSignals, signals_deferred
from vqgen.core.store.layout import RunLayout
from vqgen.core.store.manifest import state_damage
from vqgen.core.store.weights import state_dirs

DRIVER = """
import os, runpy, sys, time
from pathlib import Path
import vqgen.core.runtime.signals, vqgen.core.training.checkpoints, vqgen.core.training.loop

marker, at_step = Path(os.environ["VQGEN_TEST_MARKER"]), int(os.environ["VQGEN_TEST_AT_STEP"])
live = []
enter = vqgen.core.runtime.signals.StopSignals.__enter__

def remember(self):
    live.append(self)
    return enter(self)

def wait_for_signal():
    deadline = time.time() + 120
    while not live[-1].signum and time.time() < deadline:
        time.sleep(0.01)

real_lr = vqgen.core.training.loop.learning_rate_at

def lr_then_wait(cfg, step, total):
    if step + 1 == at_step and os.environ.get("RANK", "0") == "0" and not marker.exists():
        marker.touch()      # the test sends its signal now; this step ends once the signal is in
        wait_for_signal()
    return real_lr(cfg, step, total)

real_manifest = vqgen.core.training.checkpoints.write_manifest

def manifest_then_wait(folder):
    if live and live[-1].signum and os.environ.get("VQGEN_TEST_SAVE_MARKER"):
        Path(os.environ["VQGEN_TEST_SAVE_MARKER"]).touch()  # mid-save: the state is written, its manifest not
        time.sleep(120)
    return real_manifest(folder)

vqgen.core.runtime.signals.StopSignals.__enter__ = remember
vqgen.core.training.loop.learning_rate_at = lr_then_wait
vqgen.core.training.checkpoints.write_manifest = manifest_then_wait
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

PRIOR_ARGS = ["--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--batch-size", "16", "--lr", "0.003",
              "--warmup-steps", "0", "--lr-schedule", "constant", "--log-every", "1", "--eval-every", "0",
              "--save-every", "5", "--seed", "3"]


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, f"the process ended ({proc.returncode}) before {path.name} appeared"
        assert time.time() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


def start(spawn, tmp_path: Path, command: list[str], at_step: int, save_marker: Path | None = None,
          env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    marker = tmp_path / "at-step"
    marker.unlink(missing_ok=True)
    env = {**os.environ, **(env or {}), "VQGEN_TEST_MARKER": str(marker), "VQGEN_TEST_AT_STEP": str(at_step),
           "VQGEN_TEST_SAVE_MARKER": str(save_marker or "")}
    cmd = [sys.executable, str(driver), *command] if command[0] != "torchrun" else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--", str(driver),
        *command[1:]]
    proc = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    return proc, marker


def vqvae_command(run: Path, *extra: str) -> list[str]:
    return [str(ROOT / "scripts" / "train_vqvae.py"), "--run", str(run), *SCRIPT_ARGS, *extra]


def state_steps(stage_dir: Path) -> list[int]:
    return [step for step, _ in state_dirs(RunLayout(stage_dir.parent).vqvae if stage_dir.name == "vqvae"
                                          else RunLayout(stage_dir.parent).prior)]


def run_resume_command(stderr: str) -> subprocess.CompletedProcess:
    """The command the stop message tells the user to run, run as given (python: this interpreter)."""
    line = next(line for line in stderr.splitlines() if "resume with:" in line)
    argv = shlex.split(line.split("resume with:", 1)[1])
    assert argv[0] == "python" and argv[-1] == "--resume" and "--overwrite" not in argv
    return subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_after_the_step_with_a_state_that_resumes_bit_identically(spawn, tmp_path, signum):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert subprocess.run([sys.executable, *vqvae_command(straight, "--max-steps", "20")], capture_output=True,
                          timeout=300, cwd=ROOT).returncode == 0
    proc, marker = start(spawn, tmp_path, vqvae_command(stopped, "--max-steps", "20"), at_step=8)
    wait_for(marker, proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signum, stderr[-2000:]
    assert "Traceback" not in stderr
    assert state_steps(stopped / "vqvae") == [5, 8]                     # the stop step's state, complete
    assert not list((stopped / "vqvae" / "state").glob(".tmp-*"))
    assert f"stopped by {signal.Signals(signum).name} after step 8 of 20" in stderr
    assert str(stopped / "vqvae" / "state" / "step-00000008") in stderr
    assert not (stopped / "vqvae" / ".lock").exists()                  # the lock went with the process
    resumed = run_resume_command(stderr)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert same_weights(straight, stopped), divergence(straight, stopped)


@pytest.mark.slow
def test_a_second_signal_during_the_save_exits_at_once_leaving_only_temporary_files(spawn, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert subprocess.run([sys.executable, *vqvae_command(straight, "--max-steps", "20")], capture_output=True,
                          timeout=300, cwd=ROOT).returncode == 0
    saving = tmp_path / "saving"
    proc, marker = start(spawn, tmp_path, vqvae_command(stopped, "--max-steps", "20"), at_step=7, save_marker=saving)
    wait_for(marker, proc)
    proc.send_signal(signal.SIGTERM)
    wait_for(saving, proc)                      # the stop step's state is being written
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "exiting at once" in stderr, stderr[-2000:]
    assert state_steps(stopped / "vqvae") == [5]                         # the half-written state is not listed
    assert (stopped / "vqvae" / "state" / ".tmp-step-00000007").is_dir()  # it is only a temporary folder
    assert state_damage(stopped / "vqvae" / "state" / "step-00000005") is None  # the previous one is intact
    resumed = subprocess.run([sys.executable, *vqvae_command(stopped, "--max-steps", "20", "--resume")],
                             capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "took over" in resumed.stdout                                 # the dead run's lock file
    assert same_weights(straight, stopped), divergence(straight, stopped)
    assert not list((stopped / "vqvae" / "state").glob(".tmp-*"))


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_and_resume_bit_identically(spawn, tmp_path):
    """SIGTERM to the torchrun agent, which forwards it to both workers; they agree on a check step."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    sparse = ["--max-steps", "20", "--log-every", "100", "--save-every", "0"]  # checks at steps 10 and 20 only
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    done = spawn.run([*torchrun, *vqvae_command(straight, *sparse)], timeout=400, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    proc, marker = start(spawn, tmp_path, ["torchrun", *vqvae_command(stopped, *sparse)], at_step=4, env=env)
    wait_for(marker, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode != 0
    assert state_steps(stopped / "vqvae") == [STOP_CHECK_EVERY], stderr[-3000:]  # the first check step after 4
    assert stderr.count("resume with: accelerate launch --num_processes 2") == 1    # the main process says it
    resumed = spawn.run([*torchrun, *vqvae_command(stopped, *sparse, "--resume")], timeout=400, cwd=ROOT, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert same_weights(straight, stopped), divergence(straight, stopped)


@pytest.mark.slow
def test_the_prior_stops_on_sigterm_and_resumes_bit_identically(spawn, tiny_run, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    for run in (straight, stopped):
        shutil.copytree(tiny_run, run)
    command = [str(ROOT / "scripts" / "train_prior.py"), "--run"]
    assert subprocess.run([sys.executable, *command, str(straight), *PRIOR_ARGS, "--max-steps", "15", "--overwrite"],
                          capture_output=True, timeout=300, cwd=ROOT).returncode == 0
    proc, marker = start(spawn, tmp_path, [*command, str(stopped), *PRIOR_ARGS, "--max-steps", "15", "--overwrite"],
                         at_step=7)
    wait_for(marker, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 143, stderr[-2000:]
    assert state_steps(stopped / "prior") == [5, 7]
    resumed = run_resume_command(stderr)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_file(straight / "prior" / "model.safetensors"), load_file(stopped / "prior" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


WAIT_IN = """
import importlib, os, runpy, sys, time
from pathlib import Path

owner = importlib.import_module("{module}")
*path, name = "{attribute}".split(".")
for part in path:
    owner = getattr(owner, part)
real = getattr(owner, name)

def write_then_wait(*args, **kwargs):
    out = real(*args, **kwargs)
    Path(os.environ["VQGEN_TEST_MARKER"]).touch()  # part of the output is written: interrupt here
    time.sleep(float(os.environ.get("VQGEN_TEST_WAIT", "120")))
    return out

setattr(owner, name, write_then_wait)
sys.argv = sys.argv[1:]
runpy.run_module("vqgen", run_name="__main__")
"""


def interrupted_command(spawn, tmp_path: Path, module: str, attribute: str, argv: list[str], signum: int) -> str:
    """Run `vqgen ARGV`, stopping it with `signum` once `module.attribute` has written something."""
    driver = tmp_path / "wait_in.py"
    driver.write_text(WAIT_IN.format(module=module, attribute=attribute))
    marker = tmp_path / "written"
    proc = spawn([sys.executable, str(driver), "vqgen", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                 text=True, cwd=ROOT, env={**os.environ, "VQGEN_TEST_MARKER": str(marker)})
    wait_for(marker, proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr[-2000:]
    assert "Traceback" not in stderr and "interrupted" in stderr
    return stderr


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_sampling_leaves_no_files(spawn, tiny_run, tmp_path, signum):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    interrupted_command(spawn, tmp_path, "vqgen.core.store.sample_set", "SampleSetWriter.write",
                        ["sample", "--run", str(run), "--n", "40", "--batch-size", "8"], signum)
    assert list((run / "samples").iterdir()) == []  # neither the sample folder nor its temporary one


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_encoding_keeps_the_previous_codes(spawn, tiny_run, tmp_path, signum):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = tree_hashes(run)
    interrupted_command(spawn, tmp_path, "vqgen.core.store.codes", "save_config", ["encode", "--run", str(run)], signum)
    assert tree_hashes(run) == before                       # codes untouched, temporary folder and lock gone
    assert not (run / ".codes.tmp").exists() and not (run / "vqvae" / ".lock").exists()


def test_signals_held_back_in_a_critical_section_arrive_after_it():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(("handled", s)))
    try:
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            seen.append("renamed")
        assert seen == ["renamed", ("handled", signal.SIGTERM)]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_one_process_reads_the_flag_without_a_collective():
    class OneProcess:
        num_processes = 1

        def reduce(self, *args):
            raise AssertionError("no collective with one process")

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as Python starts, whatever was inherited
    try:
        with StopSignals(announce=False) as signals:
            assert signals.agreed(OneProcess(), 3, synced=False) == 0
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert signals.agreed(OneProcess(), 4, synced=False) == signal.SIGINT
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored to what it was
    finally:
        signal.signal(signal.SIGINT, before)


def test_an_ignored_sigint_stays_ignored():
    """A process started with SIGINT ignored (a background job) keeps ignoring it: the loop's handlers, the
    deferred renames and the commands' SIGTERM handling leave SIG_IGN alone; SIGTERM still stops training."""
    from vqgen.core.runtime.signals import terminate_interrupts

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopSignals(announce=False) as signals:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # still handled
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert signals.signum == 0
        with signals_deferred(), terminate_interrupts():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.slow
def test_sampling_started_with_sigint_ignored_ignores_it(spawn, tiny_run, tmp_path):
    """`vqgen sample` started as a background job would be (SIGINT ignored): a SIGINT changes nothing."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    driver = tmp_path / "wait_in.py"
    driver.write_text(WAIT_IN.format(module="vqgen.core.store.sample_set", attribute="SampleSetWriter.write"))
    marker = tmp_path / "written"
    ignoring = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"]
    proc = spawn([*ignoring, str(driver), "vqgen", "sample", "--run", str(run), "--n", "24", "--batch-size", "8"],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                 env={**os.environ, "VQGEN_TEST_MARKER": str(marker), "VQGEN_TEST_WAIT": "1"})
    wait_for(marker, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert len(list((run / "samples" / "0000" / "images").glob("*.png"))) == 24


def test_progress_json_holds_the_stop_step(tmp_path):
    """The loop's view: a stop request ends `fit` after the step with TrainingStopped and a state."""
    import vqgen.core.training.loop as trainer
    from conftest import TINY_DATA, TINY_VQVAE, tiny_train
    from stage1_vqvae.train import train_vqvae
    from vqgen.core.runtime.errors import TrainingStopped

    real = trainer.learning_rate_at

    def signal_at_step_3(cfg, step, total):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(cfg, step, total)

    trainer.learning_rate_at = signal_at_step_3
    try:
        with pytest.raises(TrainingStopped) as stop:
            train_vqvae(tmp_path / "run", TINY_DATA, tiny_train(max_steps=10), TINY_VQVAE, encode=False)
    finally:
        trainer.learning_rate_at = real
    assert stop.value.exit_code == 143
    progress = json.loads((tmp_path / "run/vqvae/state/step-00000003/progress.json").read_text())
    assert progress["step"] == 3 and progress["batch_in_epoch"] == 3
