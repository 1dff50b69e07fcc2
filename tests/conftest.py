"""A tiny trained run (both stages) shared by the tests that need one."""

import hashlib
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stage1_vqvae.train import train_vqvae
from stage2_prior.train import train_prior
from vqgen.core.data.images import DataConfig
from vqgen.core.training.config import TrainConfig

TINY_DATA = DataConfig(builtin_train_size=96, builtin_test_size=40)
TINY_VQVAE = dict(hidden_channels=16, res_channels=8, num_res_blocks=1, codebook_size=16, code_dim=8,
                  restart_after=5)
# dropout given (its default, 0): the entry points would otherwise size it to the tiny data
TINY_TRANSFORMER = dict(d_model=32, n_layers=2, n_heads=2, dropout=0.0)
TINY_PIXELCNN = dict(channels=16, n_layers=3, dropout=0.0)
TINY_MASKED = dict(d_model=32, n_layers=2, n_heads=2, dropout=0.0)


def tiny_train(**changes) -> TrainConfig:
    base = dict(batch_size=16, learning_rate=3e-3, max_steps=12, warmup_steps=0, log_every=1, eval_every=0,
                save_every=0, lr_schedule="constant", seed=3, report=False)  # tests/test_report.py turns it on
    return TrainConfig(**{**base, **changes})


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy 2-core machine threads stall each other. The
    training processes the tests start get one thread too (OMP_NUM_THREADS): fresh-clone suites saw a child's
    first step differ from another child's in the 7th digit at two threads, before any resume, which the
    bit-identical resume tests then reported as theirs."""
    before, before_env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(before)
    if before_env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = before_env


@pytest.fixture(autouse=True, scope="session")
def quick_judge():
    """Stage 1's sharpness evaluation trains the run's judge for 600 steps (a minute of CPU); 20 score the tiny
    runs' reconstructions just as well for what the tests check (tests/test_sharpness.py sets its own)."""
    from vqgen.core.evaluate import quality

    before = quality.JUDGE_STEPS
    quality.JUDGE_STEPS = 20
    yield
    quality.JUDGE_STEPS = before


@pytest.fixture(autouse=True, scope="session")
def arrow_cache(tmp_path_factory):
    """Arrow copies of the tests' parquet and image folders go to a temporary cache, not ~/.cache/vqgen."""
    import os

    before = os.environ.get("VQGEN_CACHE")
    os.environ["VQGEN_CACHE"] = str(tmp_path_factory.mktemp("vqgen-cache"))
    yield
    if before is None:
        os.environ.pop("VQGEN_CACHE", None)
    else:
        os.environ["VQGEN_CACHE"] = before


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps one state per process; tests that change mixed precision need a clean one."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """runs/tiny with a VQ-VAE, its codes and a conditional transformer prior. Treat as read-only."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    train_vqvae(run, TINY_DATA, tiny_train(max_steps=10), TINY_VQVAE)
    train_prior(run, "transformer", tiny_train(max_steps=10), TINY_TRANSFORMER)
    return run


@pytest.fixture(scope="session")
def tiny_masked_run(tiny_run, tmp_path_factory) -> Path:
    """The tiny run with a conditional masked prior instead of the transformer. Treat as read-only."""
    import shutil

    run = tmp_path_factory.mktemp("runs") / "tiny-masked"
    shutil.copytree(tiny_run, run)
    train_prior(run, "masked", tiny_train(max_steps=10), TINY_MASKED, overwrite=True)
    return run


def default_stop_signals() -> None:
    """Run in a child before it executes: SIGINT and SIGTERM at their default dispositions, whatever this test
    run inherited (a shell starts a background job, `nohup pytest &`, with SIGINT ignored, and children inherit
    an ignored signal)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Children:
    """The child processes of one test: each starts with the default dispositions of the stop signals, in a
    process group of its own; `end` kills every group that still runs (torchrun's workers too)."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def __call__(self, cmd: list[str], **options) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, preexec_fn=default_stop_signals, start_new_session=True, **options)
        self.procs.append(proc)
        return proc

    def run(self, cmd: list[str], timeout: float, **options) -> subprocess.CompletedProcess:
        """Like `subprocess.run(capture_output=True, text=True)`; on a timeout the whole group is ended."""
        proc = self(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options)
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def end(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group outlives its leader: a worker may still be there
            except ProcessLookupError:
                pass
            proc.wait(timeout=60)


@pytest.fixture
def spawn():
    """`spawn(cmd, **popen_options)` starts a child for the test to signal or watch; `spawn.run(cmd, timeout)`
    runs one to its end. Whatever still runs when the test ends, passed or failed, is killed."""
    children = Children()
    yield children
    children.end()


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file below `folder`: to show a failed command changed nothing."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def load_script(name: str):
    """scripts/NAME.py as a module (the scripts are entry points, not a package); NAME may be benchmarks/X."""
    spec = importlib.util.spec_from_file_location(name.replace("/", "_"), Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TWO_PROCESS_STAGE1 = """
import operator, sys
sys.path[:0] = [{root!r}, {tests!r}]
from safetensors.torch import save_file
import stage1_vqvae.train as train
from conftest import TINY_DATA, TINY_VQVAE, tiny_train
from vqgen.core.evaluate import quality

quality.JUDGE_STEPS = 20  # as the quick_judge fixture sets it

made = []
class Recorded(train.GANLoss):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        made.append(self)

train.GANLoss = Recorded
train.train_vqvae({run!r}, TINY_DATA, tiny_train(max_steps=4, batch_size=8, save_every=2), TINY_VQVAE,
                  encode=False, gan={gan!r})
rank = made[0].accelerator.process_index
module = operator.attrgetter({module!r})(made[0])
save_file({{k: v.contiguous() for k, v in module.state_dict().items()}}, {run!r} + f"/recorded-{{rank}}.safetensors")
"""


def stage1_in_two_processes(spawn, tmp_path: Path, gan: dict, module: str) -> tuple[Path, list[dict]]:
    """Train the tiny stage 1 with the adversarial/perceptual options `gan` for 4 steps under 2 CPU processes
    (torchrun, gloo) into tmp_path/run. Returns the run and the state dict of each process's `GANLoss` attribute
    `module` ("critic", "perceptual.net") at the end, rank 0 first."""
    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    script = tmp_path / "train_two.py"
    script.write_text(TWO_PROCESS_STAGE1.format(root=str(root), tests=str(root / "tests"), run=str(run), gan=gan,
                                                module=module))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = spawn.run(cmd, timeout=240, env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, [load_file(run / f"recorded-{rank}.safetensors") for rank in (0, 1)]
