"""`--compile`: refused by name where torch cannot compile; where it can, training runs compiled with the
same parameter names (checkpoints and resume unchanged) and the same losses as eager, to rounding."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import TINY_DATA, TINY_TRANSFORMER, TINY_VQVAE, tiny_train
from stage1_vqvae.train import train_vqvae
from stage2_prior.train import train_prior
from vqgen.core.runtime.errors import VQGenError


def test_compile_where_torch_cannot_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with pytest.raises(VQGenError, match=r"--compile: torch .* cannot compile on this Python"):
        train_vqvae(tmp_path / "run", TINY_DATA, tiny_train(compile=True), TINY_VQVAE)
    assert not any((tmp_path / "run").rglob("*.json"))


def test_compile_on_a_cpu_without_a_compiler_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(VQGenError, match=r"needs a C\+\+ compiler \(g\+\+, c\+\+ or clang\+\+\), none found"):
        train_vqvae(tmp_path / "run", TINY_DATA, tiny_train(compile=True), TINY_VQVAE)
    assert not any((tmp_path / "run").rglob("*.json"))


def _losses(stage_dir) -> list[float]:
    lines = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["split"] == "train"]


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("g++"), reason="compiling on the CPU needs g++")
def test_compiled_training_matches_eager(tmp_path):
    """VQ-VAE (its trunk compiled) and prior: same parameter names, losses equal to eager within rounding."""
    from safetensors.torch import load_file

    for name, compiled in (("eager", False), ("compiled", True)):
        run = tmp_path / name
        train_vqvae(run, TINY_DATA, tiny_train(max_steps=3, compile=compiled), TINY_VQVAE)
        train_prior(run, "transformer", tiny_train(max_steps=3, compile=compiled), TINY_TRANSFORMER)
    for stage in ("vqvae", "prior"):
        eager, compiled = (load_file(tmp_path / n / stage / "model.safetensors") for n in ("eager", "compiled"))
        assert sorted(eager) == sorted(compiled), f"{stage}: compiling changed the parameter names"
        torch.testing.assert_close(_losses(tmp_path / "compiled" / stage), _losses(tmp_path / "eager" / stage),
                                   rtol=1e-3, atol=1e-4)
