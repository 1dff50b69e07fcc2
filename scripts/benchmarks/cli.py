"""How long the CLI takes from process start to files written, against `python -c "import torch"`.

    python scripts/benchmarks/cli.py --run runs/default            # after the quickstart
    python scripts/benchmarks/cli.py --run runs/default --repeats 7

Prints the median wall-clock time of each command over --repeats runs (each a fresh process).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def median_seconds(cmd: list[str], repeats: int, before=None) -> float:
    times = []
    for _ in range(repeats):
        if before:
            before()
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/default", help="a trained run (default: runs/default)")
    parser.add_argument("--repeats", type=int, default=5, help="processes per command (default: 5)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if not (Path(args.run) / "prior").is_dir():
        sys.exit(f"error: {args.run} has no trained prior: run the quickstart first")
    out = Path(tempfile.mkdtemp()) / "samples"
    vqgen = [sys.executable, "-m", "vqgen"]
    rows = {
        'python -c "import torch"': median_seconds([sys.executable, "-c", "import torch"], args.repeats),
        "vqgen --help": median_seconds([*vqgen, "--help"], args.repeats),
        "vqgen sample --n 64": median_seconds([*vqgen, "sample", "--run", args.run, "--n", "64", "--out", str(out)],
                                              args.repeats, before=lambda: shutil.rmtree(out, ignore_errors=True)),
    }
    shutil.rmtree(out.parent, ignore_errors=True)
    print(f"{'command':28s} median of {args.repeats} (s)")
    for name, seconds in rows.items():
        print(f"{name:28s} {seconds:.2f}")
    torch_s = rows['python -c "import torch"']
    print(f"sample - import torch: {rows['vqgen sample --n 64'] - torch_s:+.2f} s; "
          f"--help / import torch: {rows['vqgen --help'] / torch_s:.2f}")


if __name__ == "__main__":
    main()
