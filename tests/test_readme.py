"""The README's and docs/'s commands parse exactly as written, with the parsers that will read them."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import load_script

check_readme = load_script("check_readme")
ROOT = Path(__file__).resolve().parents[1]
COMMANDS = check_readme.readme_commands()
EVERY_PAGE = check_readme.all_commands()


def bash_blocks(page: Path) -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", page.read_text(), flags=re.S)


def test_the_readme_opens_with_the_two_commands():
    assert COMMANDS[:2] == ["python3 -m venv .venv", ". .venv/bin/activate"]
    assert any("vqgen sample" in c for c in COMMANDS[:8]) and "python -m pytest" in COMMANDS
    first, second = bash_blocks(check_readme.README)[:2]
    assert re.search(r"```", check_readme.README.read_text()).start() == check_readme.README.read_text().index(
        "```bash\n" + first), "another code block comes before the two commands"
    assert first.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install -e . && ")
    assert first.endswith("&& vqgen sample --n 64") and "[test]" not in first  # running needs no test extras
    assert second == '. .venv/bin/activate && pip install -e ".[test]" && python -m pytest'


def editable_installs(commands: list[str]) -> list[str]:
    """What each `pip install … -e TARGET` installs, in order."""
    words = [shlex.split(c.split("\\")[0]) for c in commands if c.startswith("pip install")]
    return [w[w.index("-e") + 1] for w in words]


def test_ci_installs_what_the_readme_installs_then_runs_its_test_command():
    """.ci/run: the first command's `pip install -e .`, then the second's test extras, then pytest."""
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert editable_installs(COMMANDS) == [".", ".[test]"] == editable_installs(ci)
    installs = [i for i, line in enumerate(ci) if line.startswith("pip install")]
    assert installs[-1] < next(i for i, line in enumerate(ci) if line.startswith("python -m pytest"))


@pytest.mark.parametrize("page, command", EVERY_PAGE, ids=[f"{page}: {command}" for page, command in EVERY_PAGE])
def test_every_command_of_the_readme_and_docs_parses(page, command):
    try:
        check_readme.parse(command)
    except SystemExit as exit_:  # `--help` exits 0
        if exit_.code:
            pytest.fail(f"{page}: the command is refused by its parser (exit {exit_.code}): {command}")


def test_every_docs_page_is_checked():
    pages = {page for page, _ in EVERY_PAGE}
    assert "README.md" in pages and {"docs/benchmarks.md", "docs/usage.md"} <= pages


def test_a_refused_command_is_caught():
    """The check can fail: torchrun reads an option it does not know as its own."""
    with pytest.raises(SystemExit):
        check_readme.parse("torchrun --nproc_per_node 2 scripts/train_vqvae.py --run runs/x")
    with pytest.raises(SystemExit):
        check_readme.parse("vqgen sample --n 64 --colour red")
    with pytest.raises(ValueError, match="no such script"):
        check_readme.parse("python scripts/benchmarks/no_such_benchmark.py --fast")
