"""`vqgen info`, `eval` and `report`: a run's configs and metrics, how good its samples are, its HTML page."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from accelerate import Accelerator
from rich.table import Table

from vqgen.core.runtime.console import make_console
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.share.export import locate_run
from vqgen.core.store.configs import read_json
from vqgen.core.store.jsonl import JsonlLog
from vqgen.commands.common import at_least, sampling_options
from vqgen.run import Run


def cmd_info(args: argparse.Namespace) -> None:
    console = make_console()
    run = locate_run(args.run).layout
    if not (run.vqvae.config.is_file() or run.prior.config.is_file()):
        raise VQGenError(f"{run.root} is not a vqgen run (no {run.vqvae.config.relative_to(run.root)} "
                         f"nor {run.prior.config.relative_to(run.root)})")
    table = Table(title=f"run {run.root}", show_lines=True)
    table.add_column("stage", style="bold")
    table.add_column("settings")
    table.add_column("test metrics: best (the weights in use) and latest")
    for name, config_file, metrics_file in (("vqvae", run.vqvae.config, run.vqvae.metrics),
                                            ("codes", run.codes_meta, None),
                                            ("prior", run.prior.config, run.prior.metrics)):
        if not config_file.parent.is_dir():
            table.add_row(name, "not trained yet", "")
            continue
        config = read_json(config_file, f"{name} config") if config_file.is_file() else {}
        settings = ", ".join(f"{k}={v}" for k, v in config.items() if k not in ("kind", "format_version", "split_sizes"))
        if name == "vqvae" and run.vqvae.data_config.is_file():
            settings += f"\ndata: {read_json(run.vqvae.data_config, 'data config').get('source')}"
        tests = [r for r in JsonlLog(metrics_file).read() if r.get("split") == "test"] if metrics_file else []
        table.add_row(name, settings, _test_summary(tests))
    console.print(table)


def _test_summary(tests: list[dict]) -> str:
    """The best evaluation (whose weights the stage keeps) and the latest one, from metrics.jsonl."""
    if not tests:
        return ""

    def line(record: dict) -> str:
        return f"step {record['step']}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in record.items()
            if k not in ("split", "step", "time", "best_step") and not k.startswith("best_"))

    last = tests[-1]
    best = next((r for r in tests if r["step"] == last.get("best_step")), last)
    return f"best {line(best)}" + ("" if best is last else f"\nlatest {line(last)}")


def cmd_eval(args: argparse.Namespace) -> None:
    if args.samples < 0 or args.samples == 1:
        raise VQGenError(f"--samples must be 0 (none) or >= 2, got {args.samples}")
    at_least(args, 1, "judge_steps", "batch_size")
    if args.inception and not args.samples:
        raise VQGenError("--inception scores samples: give --samples N as well")
    sampling = sampling_options(args)
    console = make_console()
    accelerator = Accelerator()
    run = Run.load(args.run, need_prior=bool(args.samples), allow_vqvae_mismatch=args.allow_vqvae_mismatch,
                   device=accelerator.device)
    data = run.data()
    metrics = run.evaluate(data)
    table = Table(title=f"test metrics of {run.path}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.5g}")
    console.print(table)
    if not args.samples:
        return
    scores = run.sample_quality(accelerator, args.samples, data, sampling, seed=args.seed, batch_size=args.batch_size,
                                retrain_judge=args.retrain_judge, inception=args.inception,
                                judge_steps=args.judge_steps,
                                closest_pairs=run.outputs.closest_pairs)
    n_real = min(args.samples, len(data.train))
    table = Table(title=f"{args.samples} samples against the {len(data.test)} test images, beside {n_real} real "
                        "training images and their reconstructions",
                  caption="reconstructed: what samples would reach with a perfect prior (the VQ-VAE's ceiling)")
    for column in ("measure", "samples", "reconstructed", "real"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    for k, v in scores["samples"].items():
        others = (scores[part].get(k) for part in ("reconstructed", "real"))
        table.add_row(k, f"{v:.4g}", *("" if x is None else f"{x:.4g}" for x in others))
    console.print(table)
    if "near_copies_pixels" in scores["samples"]:  # the samples nearest to a training image, each beside it
        console.print(f"closest (sample, training image) pairs: {run.outputs.closest_pairs}")
    accuracy, chance = scores["samples"].get("judge_test_accuracy"), scores["samples"].get("judge_chance")
    if accuracy is not None and chance is not None and accuracy < min(2 * chance, (1 + chance) / 2):
        console.print(f"[bold yellow]warning:[/] the judge scores only {accuracy:.2f} on the test images (chance "
                      f"{chance:.2f}): its features say little about these images; trust the FID less")
    record = {"time": time.time(), "samples": args.samples, **dataclasses.asdict(sampling), "seed": args.seed,
              **scores}
    run.outputs.evaluations.parent.mkdir(parents=True, exist_ok=True)
    with run.outputs.evaluations.open("a") as f:
        f.write(json.dumps(record) + "\n")


def cmd_report(args: argparse.Namespace) -> None:
    from vqgen.core.report.page import write_report

    start = time.perf_counter()
    location = locate_run(args.run)
    out = args.out
    if out is None and location.read_only:  # an exported model is only read: the page goes to outputs/NAME/
        out = location.outputs.report
        out.parent.mkdir(parents=True, exist_ok=True)
    path = write_report(location.layout.root, out)
    make_console().print(f"report of {args.run} in {time.perf_counter() - start:.1f} s -> {path}")
