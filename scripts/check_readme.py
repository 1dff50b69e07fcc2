"""Every command the README and docs/ show, parsed (and the README's bash blocks optionally run) exactly as written.

    python scripts/check_readme.py            # parse each command with the parser that will read it; check links
    python scripts/check_readme.py --run      # and run the README's, in order, in a fresh clone (CPU: minutes)

Parsing uses the real parsers: the scripts', `vqgen`'s, `accelerate launch`'s and `torchrun`'s, so a
flag that one of them would refuse or find ambiguous fails here. `--run` clones the repository into a
scratch folder, writes a small `my_images/` folder (cat/ and dog/ subfolders) for the own-data
example, and runs every command that the machine can (not the multi-GPU ones, nor, unless
`--benchmarks`, the half-hour benchmarks), stopping at the first that fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
SET_UP = ("python3 -m venv", "pip install", ". .venv/bin/activate")


def pages() -> list[Path]:
    """The README and every docs/*.md page: the pages whose commands and links are checked."""
    return [README, *sorted(DOCS.glob("*.md"))]


def readme_commands(readme: Path = README) -> list[str]:
    """The shell commands of the README's bash blocks: one per line, `&&` chains split, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), flags=re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands += [part.strip() for part in line.split("&&")]
    return commands


PROGRAMS = ("vqgen ", "python scripts/", "python -m vqgen", "bash scripts/", "accelerate launch", "torchrun")


def inline_commands(readme: Path = README) -> list[str]:
    """Commands shown in running text and tables (`vqgen info`, ...): parsed, not run."""
    spans = re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"```.*?```", "", readme.read_text(), flags=re.S))
    return [span.replace("\\|", "|") for span in spans if span.startswith(PROGRAMS)]


def page_commands(page: Path) -> list[str]:
    """A page's commands: those of its bash blocks, then those in its running text and tables."""
    return readme_commands(page) + inline_commands(page)


def all_commands() -> list[tuple[str, str]]:
    """(page relative to the root, command) for every distinct command of each page: the README and docs/*.md."""
    return [(page.relative_to(ROOT).as_posix(), command) for page in pages() for command in dict.fromkeys(page_commands(page))]


LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)\)|<(?:img|a)\s[^>]*?(?:src|href)="([^"]+)"')  # [text](target), <img src=..>


def relative_links(page: Path) -> list[str]:
    """The link and picture targets of a page that point inside the repository (not URLs), code excluded."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = [next(group for group in match.groups() if group) for match in LINK.finditer(text)]
    return [target for target in targets if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens, -N on repeats."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        anchor, repeat = slug, 0
        while anchor in anchors:
            repeat += 1
            anchor = f"{slug}-{repeat}"
        anchors.add(anchor)
    return anchors


def _shown(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def broken_link(page: Path, target: str, root: Path = ROOT) -> str | None:
    """Why a relative link of `page` does not resolve (outside `root`, a missing file, no heading for its #anchor), or None."""
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page.resolve()
    if not file.is_relative_to(root.resolve()):
        return f"{_shown(page)}: {target}: outside the repository"
    if not file.exists():
        return f"{_shown(page)}: {target}: no such file"
    if anchor and file.suffix == ".md" and anchor not in heading_anchors(file):
        return f"{_shown(page)}: {target}: no heading #{anchor} in {_shown(file)}"
    return None


def _script_parser(script: str):
    """The `parse_args` of a script under scripts/ (`scripts/train_vqvae.py`, `scripts/benchmarks/speed.py`)."""
    path = ROOT / script
    if not path.is_file():
        raise ValueError(f"no such script: {script}")
    name = "_checked_" + "_".join(Path(script).with_suffix("").parts[1:])
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args


def _parse_program(words: list[str]) -> None:
    """`scripts/x.py ARGS`, `python scripts/x.py ARGS`, `-m vqgen ARGS`, `vqgen ARGS`."""
    if words[0] in ("python", "python3"):
        words = words[1:]
    if words[:2] == ["-m", "vqgen"]:
        words = ["vqgen"] + words[2:]
    if words[0] == "vqgen":
        from vqgen.cli import build_parser

        build_parser().parse_args(words[1:])
    elif words[0].startswith("scripts/") and words[0].endswith(".py"):
        _script_parser(words[0])(words[1:])
    else:
        raise ValueError(f"not a vqgen program: {' '.join(words)}")


def parse(command: str) -> None:
    """Parse one README command as its programs would; raise (or exit) when any of them refuses it."""
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if command.startswith(SET_UP):
        return
    if words[:3] in (["python", "-m", "pytest"], ["python3", "-m", "pytest"]):
        return
    if words[0] == "bash" and words[1].startswith("scripts/"):
        if not (ROOT / words[1]).is_file():
            raise ValueError(f"no such script: {words[1]}")
        return
    if words[:2] == ["accelerate", "launch"]:
        from accelerate.commands.launch import launch_command_parser

        args = launch_command_parser().parse_args(words[2:])
        inner = (["-m"] if args.module else []) + [args.training_script, *args.training_script_args]
        return _parse_program(inner)
    if words[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        args = get_args_parser().parse_args(words[1:])
        return _parse_program([args.training_script, *args.training_script_args])
    _parse_program(words)


def needs_gpus(command: str) -> bool:
    return "--multi_gpu" in command or "--mixed-precision" in command and "accelerate launch" in command


def is_benchmark(command: str) -> bool:
    return "scripts/benchmark_" in command or "scripts/benchmarks/" in command


def is_this_check(command: str) -> bool:
    return "scripts/check_readme.py" in command


def write_my_images(folder: Path) -> None:
    """A small labelled folder for the own-data example: 64x64 circles as cat/, squares as dog/."""
    from vqgen.core.data.shapes import make_shapes
    from vqgen.core.store.imageio import save_png

    images, labels, names = make_shapes(240, seed=5, size=64)
    for i, (image, label) in enumerate(zip(images, labels.tolist())):
        if names[label] in ("circle", "square"):
            save_png(image, folder / ("cat" if names[label] == "circle" else "dog") / f"{i:04d}.png")


def run_all(benchmarks: bool) -> int:
    scratch = Path(tempfile.mkdtemp(prefix="vqgen-readme-"))
    clone = scratch / "vqgen"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    write_my_images(clone / "my_images")
    for command in readme_commands():
        if needs_gpus(command) or (is_benchmark(command) and not benchmarks) or is_this_check(command):
            why = "GPUs" if needs_gpus(command) else "itself" if is_this_check(command) else "--benchmarks"
            print(f"skipped ({why}): {command}", flush=True)
            continue
        start = time.perf_counter()
        print(f"$ {command}", flush=True)
        shell = command if command.startswith("python3 -m venv") else f". .venv/bin/activate && {command}"
        done = subprocess.run(["bash", "-c", shell], cwd=clone)
        if done.returncode != 0:
            print(f"FAILED ({done.returncode}): {command}", flush=True)
            return 1
        print(f"ok in {time.perf_counter() - start:.0f} s: {command}", flush=True)
    print(f"every command ran; the clone is in {clone}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="store_true", help="also run the commands in a fresh clone")
    parser.add_argument("--benchmarks", action="store_true", help="with --run: the benchmark commands too")
    return parser.parse_args(argv)


def main() -> int:
    args = parse_args()
    commands = all_commands()
    for page, command in commands:
        try:
            parse(command)
        except SystemExit as exit_:  # `--help` exits 0 after printing
            if exit_.code:
                raise SystemExit(f"{page}: refused by its parser (exit {exit_.code}): {command}") from None
    broken = [why for page in pages() for target in relative_links(page) if (why := broken_link(page, target))]
    if broken:
        raise SystemExit("broken links:\n" + "\n".join(broken))
    print(f"{len(commands)} commands of the README and docs/ parse; their relative links resolve")
    return run_all(args.benchmarks) if args.run else 0


if __name__ == "__main__":
    sys.exit(main())
