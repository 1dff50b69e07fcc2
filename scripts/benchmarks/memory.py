"""Memory with data larger than RAM: peak memory of stage 1 (training + code dump) and of stage 2 (a prior
trained on those codes) at two dataset sizes.

    python scripts/benchmarks/memory.py                          # 30k and 100k shapes, 128x128 RGB
    python scripts/benchmarks/memory.py --images 20000 100000 --steps 300 --work /tmp/vqgen-memory
    python scripts/benchmarks/memory.py --no-stage1 --prior-steps 200   # stage 2 only, on the runs already in --work

Draws --unique shapes (`vqgen.core.data.shapes`) at --size and writes N rows cycling through them (drawing
100k on two cores would take longer than the measurement) as parquet shards of PNG bytes (small on disk;
100k at 128x128 RGB are 4.9 GB decoded: every row is decoded, encoded and dumped like any other), then runs `scripts/train_vqvae.py` on
them in a subprocess (--steps steps of a small VQ-VAE, then the code dump of every image) and polls
/proc for that process and its DataLoader workers. Reports per size: the main process's peak RSS, the
peak of the whole tree's PSS (shared pages counted once: the memory the run really takes) and of the
tree's anonymous RSS (everything but mapped files), and the wall time. Then --prior-steps steps of the
default Transformer prior on the dumped code grids (which stage 2 holds in memory, as int16), measured
the same way.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 500  # images drawn at once: bounds the float buffers of the drawing (500 x 3 x 128^2 x 4 B = 98 MB)


def _draw(args: tuple[int, int, int]) -> tuple[list[bytes], list[int]]:
    """One chunk: `n` shapes of side `size` from `seed` -> PNG bytes and labels."""
    from PIL import Image

    from vqgen.core.data.shapes import make_shapes

    n, seed, size = args
    images, labels, _ = make_shapes(n, seed=seed, size=size)
    out = []
    for x in images:
        buf = io.BytesIO()
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(buf, format="PNG", compress_level=1)
        out.append(buf.getvalue())
    return out, labels.tolist()


def generate(folder: Path, n: int, size: int, unique: int, processes: int) -> None:
    """Parquet shards of 10k rows each (columns image: PNG bytes, label: int64), row i the (i mod unique)-th
    drawn image; skipped when done."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = folder / "done.json"
    if done.is_file() and json.loads(done.read_text()) == {"images": n, "size": size, "unique": unique}:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.parquet"):
        old.unlink()
    started = time.time()
    jobs = [(min(CHUNK, unique - at), 1000 + at // CHUNK, size) for at in range(0, unique, CHUNK)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        drawn = list(pool.imap(_draw, jobs))
    pool_png = [b for png, _ in drawn for b in png]
    pool_labels = [y for _, labels in drawn for y in labels]
    for shard, at in enumerate(range(0, n, 10_000)):
        rows = range(at, min(n, at + 10_000))
        table = pa.table({"image": pa.array([pool_png[i % unique] for i in rows], pa.binary()),
                          "label": pa.array([pool_labels[i % unique] for i in rows], pa.int64())})
        pq.write_table(table, folder / f"train-{shard:05d}.parquet")
    on_disk = sum(p.stat().st_size for p in folder.glob("*.parquet"))
    print(f"generated {n} images {size}x{size} in {time.time() - started:.0f} s: {on_disk / 1e6:.0f} MB on disk, "
          f"{n * 3 * size * size / 1e9:.2f} GB decoded", flush=True)
    done.write_text(json.dumps({"images": n, "size": size, "unique": unique}))


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                children = Path(f"/proc/{p}/task/{task}/children").read_text().split()
                todo += [int(c) for c in children]
        except OSError:
            pass
    return out


def _kib(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    found = {}
    try:
        for line in Path(path).read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in keys:
                found[name] = int(rest.split()[0])
    except (OSError, ValueError):
        pass
    return found


def measure(cmd: list[str], env: dict[str, str], log: Path) -> dict[str, float]:
    """Run `cmd`, polling /proc every 0.25 s -> peaks in MiB and the wall time."""
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        peak = {"main_rss": 0, "tree_pss": 0, "tree_anon": 0, "processes": 0}
        while proc.poll() is None:
            pids = _tree(proc.pid)
            main = _kib(f"/proc/{proc.pid}/status", ("VmHWM",))
            pss = sum(_kib(f"/proc/{p}/smaps_rollup", ("Pss",)).get("Pss", 0) for p in pids)
            anon = sum(_kib(f"/proc/{p}/status", ("RssAnon",)).get("RssAnon", 0) for p in pids)
            peak = {"main_rss": max(peak["main_rss"], main.get("VmHWM", 0)), "tree_pss": max(peak["tree_pss"], pss),
                    "tree_anon": max(peak["tree_anon"], anon), "processes": max(peak["processes"], len(pids))}
            time.sleep(0.25)
    if proc.returncode != 0:
        sys.exit(f"training failed (exit {proc.returncode}); see {log}")
    return {**{k: v / 1024 for k, v in peak.items() if k != "processes"}, "processes": peak["processes"],
            "seconds": time.time() - started}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[30_000, 100_000], help="dataset sizes")
    parser.add_argument("--size", type=int, default=128, help="image side (default: 128)")
    parser.add_argument("--unique", type=int, default=5000, help="distinct images drawn (default: 5000)")
    parser.add_argument("--steps", type=int, default=300, help="stage-1 training steps (default: 300)")
    parser.add_argument("--prior-steps", type=int, default=100,
                        help="stage-2 training steps on the dumped codes (0: skip stage 2; default: 100)")
    parser.add_argument("--stage1", action=argparse.BooleanOptionalAction, default=True,
                        help="generate the data and train stage 1 (--no-stage1: reuse the runs in --work; default: on)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: vqgen's)")
    parser.add_argument("--stream", default="auto", choices=("auto", "always", "never"))
    parser.add_argument("--work", default="/tmp/vqgen-memory", help="data, Arrow cache and runs go here")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="for drawing the images")
    return parser.parse_args(argv)


def stage1(args: argparse.Namespace, n: int, run: Path, env: dict[str, str], work: Path) -> dict:
    """Draw the data (once) and train stage 1 on it with its code dump, measured -> the result row."""
    data = work / f"shapes-{n}-{args.size}"
    generate(data, n, args.size, min(n, args.unique), args.processes)
    cmd = [sys.executable, str(ROOT / "scripts" / "train_vqvae.py"), "--data", str(data), "--run", str(run),
           "--overwrite", "--stream", args.stream, "--test-fraction", "0.02", "--max-steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--hidden-channels", "8", "--res-channels", "4",
           "--num-res-blocks", "1", "--downsample", "8", "--codebook-size", "64", "--code-dim", "8",
           "--eval-every", "0", "--save-every", "0", "--log-every", "50", "--warmup-steps", "20"]
    if args.num_workers is not None:
        cmd += ["--num-workers", str(args.num_workers)]
    result = measure(cmd, env, work / f"log-{n}.txt")
    meta = json.loads((run / "codes" / "meta.json").read_text())
    grids = sum(size for _, size in meta["split_sizes"])
    assert grids == n, f"the code dump holds {grids} grids, expected {n}"
    storage = next((line for line in (work / f"log-{n}.txt").read_text().splitlines() if line.startswith("data:")), "")
    return {"stage": 1, "images": n, "decoded_gb": n * 3 * args.size ** 2 / 1e9, **result,
            "shards": sum(len(files) for _, files in meta["shards"]), "data_line": storage}


LOAD_PEAK = """
import sys
from pathlib import Path
import stage2_prior.train
from vqgen.core.store.codes import load_codes
def hwm(): return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0])
before = hwm()
splits, _ = load_codes(sys.argv[1])
print(hwm() - before, splits["train"].codes.element_size())
"""


def codes_load_peak(codes: Path, env: dict[str, str]) -> dict[str, float]:
    """What reading the code dump adds to a fresh process's peak RSS (after the imports), in MiB."""
    out = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(codes)], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return {"codes_load_peak_mib": int(out[0]) / 1024, "code_bytes": int(out[1])}


def stage2(args: argparse.Namespace, n: int, run: Path, env: dict[str, str], work: Path) -> dict:
    """--prior-steps steps of the default prior on the run's code dump, measured -> the result row."""
    meta_file = run / "codes" / "meta.json"
    if not meta_file.is_file():
        sys.exit(f"no code dump at {run / 'codes'}: run stage 1 first (without --no-stage1)")
    meta = json.loads(meta_file.read_text())
    grids = sum(size for _, size in meta["split_sizes"])
    cmd = [sys.executable, str(ROOT / "scripts" / "train_prior.py"), "--run", str(run), "--overwrite",
           "--max-steps", str(args.prior_steps), "--eval-every", "0", "--save-every", "0", "--log-every", "50",
           "--no-report"]
    result = measure(cmd, env, work / f"log-{n}-prior.txt")
    return {"stage": 2, "images": n, "decoded_gb": n * 3 * args.size ** 2 / 1e9, **result,
            "codes_int16_mib": grids * meta["grid_height"] * meta["grid_width"] * 2 / 2**20,
            **codes_load_peak(run / "codes", env)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    env = {**os.environ, "VQGEN_CACHE": str(work / "cache"), "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    rows = []
    for n in args.images:
        run = work / f"run-{n}"
        for wanted, measure_stage in ((args.stage1, stage1), (args.prior_steps > 0, stage2)):
            if wanted:
                rows.append(measure_stage(args, n, run, env, work))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| stage | images | decoded | main RSS peak | tree PSS peak | tree anon RSS peak | processes | time | "
          "reading the codes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        codes = f"+{r['codes_load_peak_mib']:.0f} MiB" if "codes_load_peak_mib" in r else ""
        print(f"| {r['stage']} | {r['images']:,} | {r['decoded_gb']:.1f} GB | {r['main_rss']:.0f} MiB | "
              f"{r['tree_pss']:.0f} MiB | {r['tree_anon']:.0f} MiB | {r['processes']} | {r['seconds']:.0f} s | {codes} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
