"""Peak memory of `vqgen sample` at two sample counts, same batch size: it follows the batch, not n.

    python scripts/benchmarks/sampling_memory.py --run runs/mine --n 2000 20000 --batch-size 500

Each count runs `python -m vqgen sample` in a fresh child process, so that one measurement cannot
inherit the other's peak, and reads that child's peak resident set size (`ru_maxrss` of
RUSAGE_CHILDREN, in a small wrapper process of its own). The samples go to a temporary folder.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WRAPPER = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(done.returncode)")


def peak_rss_mb(command: list[str]) -> tuple[float, float]:
    """(peak resident memory in MB, seconds) of `command` run as a child process."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WRAPPER, *command], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return int(done.stdout.strip().splitlines()[-1]) / 1024, seconds  # ru_maxrss is in KB on Linux


def measure(run: str, counts: list[int], batch_size: int) -> list[tuple[int, float, float]]:
    """(n, peak MB, seconds) for each n."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="vqgen-memory-") as tmp:
        for n in counts:
            out = Path(tmp) / f"n{n}"
            command = [sys.executable, "-m", "vqgen", "sample", "--run", run, "--n", str(n),
                       "--batch-size", str(batch_size), "--out", str(out)]
            peak, seconds = peak_rss_mb(command)
            assert len(list((out / "images").iterdir())) == n, f"{out}: not {n} images"
            rows.append((n, peak, seconds))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a trained run directory (both stages)")
    parser.add_argument("--n", type=int, nargs=2, default=[2000, 20000], help="the two sample counts (default: 2000 20000)")
    parser.add_argument("--batch-size", type=int, default=500, help="samples per batch (default: 500)")
    args = parser.parse_args(argv)
    rows = measure(args.run, args.n, args.batch_size)
    print(f"{'n':>8} {'peak RSS':>10} {'seconds':>8}")
    for n, peak, seconds in rows:
        print(f"{n:>8} {peak:>7.0f} MB {seconds:>8.1f}")
    ratio = rows[1][1] / rows[0][1]
    print(f"peak at n={rows[1][0]} / peak at n={rows[0][0]}: {ratio:.3f} ({'within' if ratio <= 1.1 else 'above'} 10%)")
    return 0 if ratio <= 1.1 else 1


if __name__ == "__main__":
    sys.exit(main())
