"""`vqgen info`, `eval` and `report`: a run's configs and metrics, how good its samples are, its HTML page."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from accelerate import Accelerator
from rich.table import Table

from stage2_prior.config import ADOPT_CANDIDATES, SamplingConfig
from stage2_prior.registry import AdoptedGuidance, load_adopted
from vqgen.arguments import given_options
from vqgen.commands.common import at_least, guidance_flags, prior_sampling, sampling_options
from vqgen.core.evaluate.seeds import aggregate_seeds, compare_paired
from vqgen.core.runtime.console import make_console
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.share.export import locate_run
from vqgen.core.store.configs import read_json, save_config
from vqgen.core.store.jsonl import JsonlLog
from vqgen.core.store.weights import weights_fingerprint
from vqgen.draws import LabelPlan
from vqgen.run import Run
from vqgen.sweep import (ADOPT_CLASS_LOSS, ADOPT_MARGIN, MIN_SAMPLES, SWEPT_MEASURES, adoptable, check_adoptable,
                         ineligible, option_names, parse_sweep, sample_mean, setting_label, shown, varied_settings)


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
        hidden = ("kind", "format_version", "split_sizes")
        settings = ", ".join(f"{k}={v}" for k, v in config.items() if k not in hidden)
        if name == "vqvae" and run.vqvae.data_config.is_file():
            settings += f"\ndata: {read_json(run.vqvae.data_config, 'data config').get('source')}"
        adopted = load_adopted(run.prior) if name == "prior" else None
        if adopted is not None:
            settings += (f"\nsamples with --cfg {adopted.cfg_scale:g} --cfg-schedule {adopted.cfg_schedule} (adopted: "
                         f"{adopted.measured})")
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
    if args.samples < 0 or 0 < args.samples < MIN_SAMPLES:
        raise VQGenError(f"--samples must be 0 (none) or at least {MIN_SAMPLES} (the k-NN measures need more than "
                         f"5), got {args.samples}")
    at_least(args, 1, "judge_steps", "batch_size", "seeds")
    for option, given in (("--inception", args.inception), ("--seeds", args.seeds > 1), ("--sweep", args.sweep),
                          ("--adopt", args.adopt)):
        if given and not args.samples:
            raise VQGenError(f"{option} scores samples: give --samples N as well")
    settings = _settings(args)
    console = make_console()
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    run = Run.load(args.run, need_prior=bool(args.samples), allow_vqvae_mismatch=args.allow_vqvae_mismatch,
                   device=accelerator.device)
    if args.adopt and run.read_only:
        raise VQGenError(f"--adopt writes the prior's guidance into {run.layout.prior.path}, but {args.run} is an "
                         "exported model, which is only read: adopt in the run it came from")
    if args.adopt and not run.prior.config.num_classes:
        raise VQGenError(f"--adopt chooses the guidance of a conditional prior; the prior in {run.layout.prior.path} "
                         "is unconditional")
    if args.samples:  # the prior's defaults filled in, every setting checked before any is drawn
        settings = prior_sampling(run, settings, console)
        for sampling in settings:
            run.check_sampling(args.samples, LabelPlan(), sampling)
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
    seeds = [args.seed + i for i in range(args.seeds)]
    results = []  # per setting: the per-seed scores
    for i, sampling in enumerate(settings):
        results.append([run.sample_quality(accelerator, args.samples, data, sampling, seed=seed,
                                           batch_size=args.batch_size, retrain_judge=args.retrain_judge and not
                                           (i or j), inception=args.inception, judge_steps=args.judge_steps,
                                           closest_pairs=run.outputs.closest_pairs if not (i or j) else None)
                        for j, seed in enumerate(seeds)])
    summaries = [aggregate_seeds(runs) for runs in results]
    if len(settings) == 1:
        _measure_table(console, args.samples, len(data.test), min(args.samples, len(data.train)), seeds,
                       summaries[0])
    else:
        _sweep_table(console, settings, results, summaries, seeds)
    first = results[0][0]["samples"]
    if "near_copies_pixels" in first:
        console.print(f"closest (sample, training image) pairs: {run.outputs.closest_pairs}")
    accuracy, chance = first.get("judge_test_accuracy"), first.get("judge_chance")
    if accuracy is not None and chance is not None and accuracy < min(2 * chance, (1 + chance) / 2):
        console.print(f"[bold yellow]warning:[/] the judge scores only {accuracy:.2f} on the test images (chance "
                      f"{chance:.2f}): its features say little about these images; trust the FID less")
    sweep_id = f"{time.time():.0f}" if len(settings) > 1 else None
    run.outputs.evaluations.parent.mkdir(parents=True, exist_ok=True)
    with run.outputs.evaluations.open("a") as f:
        for i, (sampling, runs, summary) in enumerate(zip(settings, results, summaries)):
            means = {part: {k: v["mean"] for k, v in summary[part].items()} for part in ("samples", "reconstructed",
                                                                                         "real")}
            record = {"time": time.time(), "n": args.samples, **dataclasses.asdict(sampling),
                      "seed": seeds[0], "seeds": seeds, "mixed_precision": args.mixed_precision, **means,
                      "spread": {part: {k: v["std"] for k, v in summary[part].items()} for part in means},
                      "per_seed": runs if len(seeds) > 1 else None,
                      "sweep_id": sweep_id, "baseline": None if sweep_id is None or i == 0 else 0}
            f.write(json.dumps(record) + "\n")
    if args.adopt and accelerator.is_main_process:
        _adopt(run, settings, summaries, args.samples, seeds, console)


def _settings(args: argparse.Namespace) -> list[SamplingConfig]:
    """The sampling settings to score: the sweep's, the options given, or for --adopt without either the
    ADOPT_CANDIDATES; checked, with what they leave to the prior still unset."""
    given = sampling_options(args)
    if args.adopt:
        check_adoptable(args.sweep, given_options(args, SamplingConfig))
        if not args.sweep and given.cfg_scale is None and given.cfg_schedule is None:
            return [SamplingConfig(cfg_scale=scale, cfg_schedule=schedule) for scale, schedule in ADOPT_CANDIDATES]
    return parse_sweep(args.sweep, given) if args.sweep else [given]


def _adopt(run: Run, settings: list[SamplingConfig], summaries: list[dict], n: int, seeds: list[int],
           console) -> None:
    """Record the guidance of the best setting (`adoptable`) as the prior's (prior/sampling.json), tied to its
    weights; one line saying what and why. Refused in one line, with no record written, when no setting
    qualifies."""
    best = adoptable(summaries)
    if best is None:
        raise VQGenError("nothing adopted: the first setting's samples are near-copies of training images more often "
                         "than held-out images are, and every other setting's too or it loses more than "
                         f"{ADOPT_CLASS_LOSS:g} of the first one's class accuracy (see the table above)")
    chosen, fid = settings[best], sample_mean(summaries[best], "fid")
    over = f"{n} samples x {len(seeds)} seed{'s' * (len(seeds) > 1)}"
    # the settings passed over whatever their FID, and why: a lower FID among them is not what was adopted
    passed = [f"{guidance_flags(settings[i])} ({why})" for i, summary in enumerate(summaries)
              if (why := ineligible(summary, summaries[0]))]
    eligible = len(settings) - len(passed)
    among = f"the {eligible} eligible of {len(settings)}" if passed else f"{len(settings)}"
    if best:
        accuracy = [sample_mean(summaries[i], "class_accuracy") for i in (best, 0)]
        measured = (f"the lowest in-domain FID of {among} settings, {over}: {fid:.4g} against "
                    f"{sample_mean(summaries[0], 'fid'):.4g} for {guidance_flags(settings[0])}"
                    + (f", class accuracy {accuracy[0]:.3g} against {accuracy[1]:.3g}" if None not in accuracy
                       else ""))
    elif len(settings) > 1:
        others = f"{eligible - 1} eligible" if passed else f"{len(settings) - 1}"
        measured = (f"in-domain FID {fid:.4g}, {over}; none of the other {others} settings more than "
                    f"{ADOPT_MARGIN:.0%} lower")
    else:
        measured = f"in-domain FID {fid:.4g}, {over}"
    if passed:
        measured += f"; not eligible: {', '.join(passed)}"
    adopted = AdoptedGuidance(cfg_scale=chosen.cfg_scale, cfg_schedule=chosen.cfg_schedule,
                              prior_weights=weights_fingerprint(run.layout.prior.path), measured=measured)
    save_config(adopted, run.layout.prior.sampling)
    console.print(f"adopted {guidance_flags(chosen)} for this prior "
                  f"({measured}) -> {run.layout.prior.sampling}")


def _measure_table(console, n: int, n_test: int, n_real: int, seeds: list[int], summary: dict) -> None:
    """One setting: each measure of the samples beside the reconstructions and real images, mean ± std."""
    over = f" over {len(seeds)} seeds (mean ± standard deviation)" if len(seeds) > 1 else ""
    table = Table(title=f"{n} samples against the {n_test} test images, beside {n_real} real training images and "
                        f"their reconstructions{over}",
                  caption="reconstructed: what samples would reach with a perfect prior (the VQ-VAE's ceiling); "
                          "near_copies*: shares of samples nearer a training image than 95 % of held-out images are")
    for column in ("measure", "samples", "reconstructed", "real"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    for k, v in summary["samples"].items():
        table.add_row(k, shown(v), *(shown(summary[part].get(k)) for part in ("reconstructed", "real")))
    console.print(table)


def _sweep_table(console, settings: list, results: list, summaries: list, seeds: list[int]) -> None:
    """A sweep: one row per setting, fidelity (FID, precision), variety (recall) and memorisation side by side;
    a * marks a difference from the first setting larger than its paired 95 % spread over the seeds."""
    varied = varied_settings(settings)
    table = Table(title=f"sweep over {option_names(varied)}: {len(seeds)} seed(s) each, the same for every setting; "
                        "copies: samples nearer a training image than 95 % of held-out images are (pixels)",
                  caption="* differs from the first row by more than the paired 95 % spread of the seeds"
                          if len(seeds) > 1 else "one seed: differences are not tested (give --seeds 3 or more)")
    table.add_column("setting")
    for _, header in SWEPT_MEASURES:
        table.add_column(header, justify="right")
    table.add_column("held-out copies", justify="right")
    for i, (sampling, summary) in enumerate(zip(settings, summaries)):
        differs = compare_paired(results[0], results[i])["samples"] if i and len(seeds) > 1 else {}
        cells = []
        for name, _ in SWEPT_MEASURES:
            mark = "*" if differs.get(name, {}).get("exceeds") else ""
            cells.append(shown(summary["samples"].get(name)) + mark)
        table.add_row(setting_label(sampling, varied), *cells,
                      shown(summary["samples"].get("near_copies_heldout_pixels")))
    console.print(table)


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
