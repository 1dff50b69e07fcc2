"""The README's commands parse exactly as written, with the parsers that will read them."""

from __future__ import annotations

import pytest

from conftest import load_script

check_readme = load_script("check_readme")
COMMANDS = check_readme.readme_commands()
INLINE = check_readme.inline_commands()


def test_the_readme_opens_with_the_two_commands():
    assert COMMANDS[:2] == ["python3 -m venv .venv", ". .venv/bin/activate"]
    assert any("vqgen sample" in c for c in COMMANDS[:8]) and "python -m pytest" in COMMANDS


@pytest.mark.parametrize("command", COMMANDS + INLINE)
def test_readme_command_parses(command):
    try:
        check_readme.parse(command)
    except SystemExit as exit_:  # `--help` exits 0
        if exit_.code:
            pytest.fail(f"the README command is refused by its parser (exit {exit_.code}): {command}")


def test_a_refused_command_is_caught():
    """The check can fail: torchrun reads an option it does not know as its own."""
    with pytest.raises(SystemExit):
        check_readme.parse("torchrun --nproc_per_node 2 scripts/train_vqvae.py --run runs/x")
    with pytest.raises(SystemExit):
        check_readme.parse("vqgen sample --n 64 --colour red")
