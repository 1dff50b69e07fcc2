"""The shape of the code base: imports point down, the CLI starts without torch, every option has help,
and the training loop never waits for the device outside logging steps."""

from __future__ import annotations

import ast
import dataclasses
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from torch.overrides import TorchFunctionMode

from conftest import TINY_DATA, TINY_TRANSFORMER, TINY_VQVAE, load_script, tiny_train

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vqgen", "stage1_vqvae", "stage2_prior")


def layer(module: str) -> int:
    """0 foundation, 1 the stages, 2 the pipeline, 3 the user's surface (CLI, argument parsing)."""
    if module.startswith("vqgen.core"):
        return 0
    if module.startswith(("stage1_vqvae", "stage2_prior")):
        return 1
    if module in ("vqgen.run", "vqgen.draws"):  # the run object and who draws which sample
        return 2
    return 3


def project_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(path: Path, module: str) -> list[str]:
    """Every project module `path` imports, at any depth of the file (function-level imports count)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else ".".join(module.split(".")[:-node.level] + [node.module])
            names.append(base)
            names += [f"{base}.{a.name}" for a in node.names]  # `from vqgen import pipeline`
    modules = project_modules()
    return sorted({n for n in names if n in modules})


def test_the_layering_test_sees_an_upward_import():
    """The check below can fail: a foundation module importing a stage is caught."""
    tree = "from stage1_vqvae.model import VQVAE\nimport vqgen.run\n"
    fake = ROOT / "vqgen" / "core" / "_fake_for_test.py"
    try:
        fake.write_text(tree)
        assert upward_imports() == [("vqgen.core._fake_for_test", "stage1_vqvae.model"),
                                    ("vqgen.core._fake_for_test", "vqgen.run")]
    finally:
        fake.unlink()


def upward_imports() -> list[tuple[str, str]]:
    bad = []
    for module, path in sorted(project_modules().items()):
        for imported in imports_of(path, module):
            cross_stage = layer(module) == layer(imported) == 1 and module.split(".")[0] != imported.split(".")[0]
            if layer(imported) > layer(module) or cross_stage:
                bad.append((module, imported))
    return bad


def test_every_import_points_down():
    assert upward_imports() == []


# The foundation's groups and what each may import (vqgen/core/__init__.py says why).
GROUPS = {
    "runtime": set(),
    "store": {"runtime"},
    "data": {"runtime", "store"},
    "evaluate": {"runtime", "store", "data"},
    "report": {"runtime", "store", "evaluate"},
    "training": {"runtime", "store", "data", "evaluate", "report"},
    "share": {"runtime", "store", "data"},
}


def group(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if parts[:2] == ["vqgen", "core"] and len(parts) > 2 else None


def imports_across_groups() -> list[tuple[str, str]]:
    """Foundation modules that import from a group their own group may not import."""
    bad = []
    for module, path in sorted(project_modules().items()):
        mine = group(module)
        if mine is None:
            continue
        for imported in imports_of(path, module):
            theirs = group(imported)
            if theirs is not None and theirs != mine and theirs not in GROUPS.get(mine, set()):
                bad.append((module, imported))
    return bad


def test_the_foundation_is_grouped_and_each_group_imports_only_what_it_may():
    loose = sorted(m for m in project_modules() if group(m) is not None and m.count(".") == 2 and group(m) not in GROUPS)
    assert loose == [], "every foundation module belongs to one of the groups"
    for name in GROUPS:
        init = ROOT / "vqgen" / "core" / name / "__init__.py"
        assert init.is_file() and ast.get_docstring(ast.parse(init.read_text())), f"{name}/__init__.py says what it owns"
    assert imports_across_groups() == []


def test_the_group_check_sees_a_forbidden_import():
    """The check above can fail: the store importing the training loop is caught."""
    fake = ROOT / "vqgen" / "core" / "store" / "_fake_for_test.py"
    try:
        fake.write_text("from vqgen.core.training.loop import fit\n")
        assert imports_across_groups() == [("vqgen.core.store._fake_for_test", "vqgen.core.training.loop")]
    finally:
        fake.unlink()


def test_the_cli_parses_without_torch():
    """`vqgen --help` and the training commands' parsers (the scripts') have no reason to import torch."""
    code = ("import sys, vqgen.cli; vqgen.cli.build_parser().format_help(); "
            "[vqgen.cli.build_parser().parse_args(['train', s, '--max-steps', '1']) for s in ('vqvae', 'prior')]; "
            "print(sorted(m for m in ('torch', 'accelerate', 'datasets', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def _option_helps(parser) -> list[tuple[str, str]]:
    """(flag, help) of every option of a parser and its subcommands."""
    found = []
    for action in parser._actions:
        if action.option_strings and action.help != "==SUPPRESS==":
            found.append((action.option_strings[-1], action.help or "", action.choices))
        if isinstance(action.choices, dict):  # subcommands
            for sub in action.choices.values():
                found += _option_helps(sub)
    return found


def test_every_option_has_help_and_lists_its_choices():
    """Every command's options, `vqgen train vqvae|prior` (and so the training scripts) included."""
    from vqgen.cli import build_parser

    found = _option_helps(build_parser())
    assert {"--preset", "--prior", "--max-steps", "--codebook-size", "--d-model", "--cfg"} <= {f for f, _, _ in found}
    for flag, help_text, choices in found:
        if flag == "--help":
            continue
        words = help_text.split("(default")[0].strip()
        assert len(words.split()) >= 2 and words != flag.strip("-").replace("-", " "), f"{flag}: {help_text!r}"
        if choices and not isinstance(choices, dict):
            assert all(str(c) in help_text for c in choices), f"{flag}: {help_text!r}"


def test_the_training_scripts_are_vqgen_train():
    """scripts/train_vqvae.py ARGS parses as `vqgen train vqvae ARGS` (and the prior's likewise)."""
    from vqgen.cli import build_parser

    for stage in ("vqvae", "prior"):
        argv = ["--run", "runs/x", "--max-steps", "7"]
        assert load_script(f"train_{stage}").parse_args(argv) == build_parser().parse_args(["train", stage, *argv])


def test_every_config_field_carries_its_help():
    from stage1_vqvae.config import DiscriminatorConfig, GANConfig, VQVAEConfig
    from stage2_prior.config import PRIOR_CONFIGS, SamplingConfig
    from vqgen.core.data.config import DataConfig
    from vqgen.core.training.config import TrainConfig

    configs = [VQVAEConfig, GANConfig, DiscriminatorConfig, DataConfig, TrainConfig, SamplingConfig,
               *PRIOR_CONFIGS.values()]
    missing = [f"{cls.__name__}.{f.name}" for cls in configs for f in dataclasses.fields(cls)
               if not f.metadata.get("help")]
    assert missing == []


# -- device syncs in the training loop ---------------------------------------------------------

SYNCS = {"item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__int__", "__float__", "__index__"}


class SyncCounter(TorchFunctionMode):
    """Counts the tensor calls that make the host wait for the device (on a GPU).

    Not counted: torch.optim reading its step counter, which a (non-capturable) optimizer keeps on
    the CPU precisely so that reading it never waits for the device.
    """

    def __init__(self):
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCS and f"torch{os.sep}optim{os.sep}" not in sys._getframe(1).f_code.co_filename:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def _syncs(train, steps: int) -> Counter:
    counter = SyncCounter()
    with counter:
        train(tiny_train(max_steps=steps, log_every=1000, eval_every=0, save_every=0))
    return counter.calls


@pytest.mark.parametrize("stage", ["vqvae", "transformer", "masked"])  # a stage, or the prior kind of stage 2
def test_training_steps_do_not_wait_for_the_device(tmp_path, tiny_run, stage):
    """Syncs happen at set-up, logging, evaluation and saving only: 8 steps cost as many as 3."""
    from stage1_vqvae.train import train_vqvae
    from stage2_prior.train import train_prior

    def train(cfg, i=iter(range(100))):
        run = tmp_path / f"run{next(i)}"
        if stage == "vqvae":
            train_vqvae(run, TINY_DATA, cfg, TINY_VQVAE, encode=False)
        else:  # the masked prior's size fields are the transformer's
            train_prior(run, stage, cfg, TINY_TRANSFORMER, codes_dir=tiny_run / "codes",
                        allow_vqvae_mismatch=True)

    few, many = _syncs(train, 3), _syncs(train, 5)
    assert few == many, f"per-step syncs: {many - few}"
