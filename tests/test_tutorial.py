"""docs/tutorial.md runs as written: its Python blocks, in order, in one namespace, in a scratch folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "tutorial.md"


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.slow
def test_the_tutorial_runs_and_prints_every_shape(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # its runs/tutorial goes to the scratch folder
    blocks = python_blocks(TUTORIAL)
    assert len(blocks) >= 8
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{TUTORIAL.name}, block {i + 1}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "z_e: (8, 16, 8, 8)" in out and "distances: (512, 64)" in out and "z_q: (8, 16, 8, 8)" in out
    assert "z_e receives exactly the gradient sent to z_q: True" in out
    assert "the same seed, the same samples: True" in out and "sampled codes: (8, 8, 8)" in out
    assert (tmp_path / "runs" / "tutorial" / "prior" / "model.safetensors").is_file()
