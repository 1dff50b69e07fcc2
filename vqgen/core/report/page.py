"""The run report: one self-contained HTML page (`vqgen report`, and refreshed by training at each evaluation).

For each stage that exists: its training and test curves from metrics.jsonl (across resumes, the best
evaluation marked), its configs as tables; stage 1 adds its reconstructions and the frequencies of the test
codes; then the newest sample grids with their settings. Every image is embedded as a data URI: the file
needs no network and no other file, and has no script. The plotted data is gathered here (`collect`, pure
and testable without matplotlib); `vqgen.core.report.figures` draws it.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vqgen.core.evaluate.measures import code_usage
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store.atomic import temporary_file, writing
from vqgen.core.store.codes import load_codes
from vqgen.core.store.configs import read_json
from vqgen.core.store.jsonl import JsonlLog
from vqgen.core.store.layout import ModelDir, RunLayout, SampleSetDir
from vqgen.core.store.weights import weights_fingerprint

NEWEST_SAMPLE_SETS = 3
NEWEST_EVALUATIONS = 12
# the sample-quality columns: (key of the record's "samples", header); FID beside its ceiling and floor
EVALUATION_COLUMNS = (("fid", "FID"), ("kid", "KID"), ("precision", "precision"), ("recall", "recall"),
                      ("class_accuracy", "class acc."), ("near_copies_pixels", "near-copies"),
                      ("near_copies_heldout_pixels", "held-out near-copies"))
SKIP = {"split", "step", "time", "best_step"}  # and every best_* key: not curves


@dataclass(frozen=True)
class Panel:
    title: str
    lines: tuple[tuple[str, str, str], ...]  # (split, metric, legend label)
    log: bool = False                        # log y axis (when every value is positive)


# The panels in the order shown; a metric none of them names gets a panel of its own after them.
PANELS = (
    Panel("loss", (("train", "loss", "train loss"), ("train", "commitment", "train commitment"),
                   ("train", "codebook", "train codebook")), log=True),
    Panel("MSE ([0, 1] pixels)", (("train", "recon_mse", "train"), ("test", "mse", "test")), log=True),
    Panel("PSNR (dB)", (("test", "psnr", "test"),)),
    Panel("bits per code", (("train", "bits_per_code", "train"), ("test", "bits_per_code", "test"),
                            ("test", "code_entropy", "test code entropy (log2 perplexity)"))),
    Panel("bits per image", (("test", "bits_per_image", "test"),)),
    Panel("codebook usage", (("train", "usage", "train"), ("test", "usage", "test"))),
    Panel("perplexity", (("train", "perplexity", "train"), ("test", "perplexity", "test"))),
    Panel("dead codes", (("train", "dead_codes", "train"), ("test", "dead_codes", "test"))),
    Panel("learning rate", (("train", "lr", "lr"),)),
    Panel("samples per second", (("train", "samples_per_s", "train"),)),
)


@dataclass
class Curves:
    """One stage's metric history: split -> metric -> (steps, values), as the surviving line of training
    across resumes (what a resumed run logged again replaces what the interrupted one had logged)."""

    series: dict[str, dict[str, tuple[list[int], list[float]]]]
    resumes: list[int]            # the first step each resumed run logged where an earlier run had gone further
    best_step: int | None         # the evaluation whose weights the stage keeps
    held_metric: str | None       # the test metric that chose it
    best_value: float | None
    latest_step: int

    def panels(self) -> list[Panel]:
        """The panels that have data, each with only its lines that have data."""
        has = {(split, key) for split, metrics in self.series.items() for key in metrics}
        out = []
        for panel in PANELS:
            lines = tuple(line for line in panel.lines if line[:2] in has)
            if lines:
                out.append(Panel(panel.title, lines, panel.log))
        named = {line[:2] for panel in PANELS for line in panel.lines}
        for key in sorted({key for _, key in has}):
            lines = tuple((split, key, split) for split in ("train", "test") if (split, key) in has - named)
            if lines:
                out.append(Panel(key.replace("_", " "), lines))
        return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def curves(records: list[dict[str, Any]]) -> Curves:
    """metrics.jsonl records -> curves. A record whose step is not past the last one of its split starts a
    resumed run: the records of every split at or after that step came from the interrupted run and go."""
    kept: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    resumes = []
    for record in records:
        split, step = record.get("split"), record.get("step")
        if split not in kept or not isinstance(step, int) or isinstance(step, bool):
            continue
        if kept[split] and step <= kept[split][-1]["step"]:
            for name in kept:
                kept[name] = [r for r in kept[name] if r["step"] < step]
            resumes = [s for s in resumes if s < step] + [step]
        kept[split].append(record)
    series: dict[str, dict[str, tuple[list[int], list[float]]]] = {"train": {}, "test": {}}
    for split, rows in kept.items():
        for row in rows:
            values = dict(row)
            if split == "test" and _number(row.get("perplexity")) and row["perplexity"] > 0 \
                    and "bits_per_code" not in row:  # stage 1: what a prior of the codes' frequencies alone costs
                values["code_entropy"] = math.log2(row["perplexity"])
            for key, value in values.items():
                if key in SKIP or key.startswith("best_") or not _number(value):
                    continue
                steps, ys = series[split].setdefault(key, ([], []))
                steps.append(row["step"])
                ys.append(float(value))
    best_step = held = best_value = None
    if kept["test"]:
        last = kept["test"][-1]
        best_step = last.get("best_step") if isinstance(last.get("best_step"), int) else None
        held = next((k[len("best_"):] for k in last if k.startswith("best_") and k != "best_step"), None)
        best_value = last.get(f"best_{held}") if held else None
    latest = max((rows[-1]["step"] for rows in kept.values() if rows), default=0)
    return Curves({s: m for s, m in series.items() if m}, resumes, best_step, held, best_value, latest)


@dataclass(frozen=True)
class Histogram:
    """How often each code occurs in a split's code grids, most frequent first."""

    split: str
    sorted_counts: list[int]
    usage: float          # share of the codebook used
    perplexity: float     # exp(entropy) of the frequencies
    dead_codes: int


def code_histogram(codes: Tensor, codebook_size: int, split: str = "test") -> Histogram:
    """(n, h, w) int codes -> their frequencies sorted, with usage and perplexity as `code_usage` has them."""
    counts = torch.bincount(codes.flatten().long(), minlength=codebook_size)
    usage = code_usage(counts)
    return Histogram(split, sorted(counts.tolist(), reverse=True), usage["usage"], usage["perplexity"],
                     int(usage["dead_codes"]))


@dataclass
class StageReport:
    name: str
    title: str
    curves: Curves | None
    configs: dict[str, dict[str, Any]]      # caption -> fields
    images: list[tuple[str, Path]] = field(default_factory=list)  # (caption, PNG)


@dataclass
class SampleSet:
    path: Path
    grid: Path
    settings: dict[str, Any]


@dataclass
class Report:
    run: Path
    stages: list[StageReport]
    histogram: Histogram | None
    codes: dict[str, Any]
    samples: list[SampleSet]
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # evaluations.jsonl, newest last
    closest_pairs: Path | None = None


@dataclass(frozen=True)
class SweepPoint:
    """One setting of a sweep: fidelity (precision), variety (recall) and near-copy share of its samples."""

    label: str
    precision: float
    recall: float
    copies: float | None


def _config(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except VQGenError:
        return None
    return data if isinstance(data, dict) else None


def _stage(stage: ModelDir, name: str, title: str, files: dict[str, Path]) -> StageReport | None:
    records = JsonlLog(stage.metrics).read()
    configs = {caption: data for caption, path in files.items() if (data := _config(path)) is not None}
    if not records and not configs:
        return None
    report = StageReport(name, title, curves(records) if records else None, configs)
    if stage.reconstructions.is_dir():
        shots = sorted(stage.reconstructions.glob("step-*.png"))
        best = report.curves.best_step if report.curves else None
        chosen = [p for p in shots if best is not None and p.stem == f"step-{best:07d}"]
        if shots and shots[-1] not in chosen:
            chosen.append(shots[-1])
        for path in chosen:
            step = int(path.stem.split("-")[1])
            kind = "best evaluation" if best == step else "latest evaluation"
            report.images.append((f"step {step} ({kind}): 16 test images (top) and their reconstructions (bottom)",
                                  path))
    return report


def collect(run_dir: str | os.PathLike) -> Report:
    """Everything the report shows, read from the run directory."""
    run = RunLayout(run_dir)
    stages = [s for s in (
        _stage(run.vqvae, "vqvae", "Stage 1: VQ-VAE", {"model (config.json)": run.vqvae.config,
                                                        "training (train_config.json)": run.vqvae.train_config,
                                                        "data (data_config.json)": run.vqvae.data_config}),
        _stage(run.prior, "prior", "Stage 2: prior", {"model (config.json)": run.prior.config,
                                                      "training (train_config.json)": run.prior.train_config,
                                                      "codes (source.json)": run.prior.source}),
    ) if s is not None]
    histogram, codes = None, _config(run.codes_meta) or {}
    if codes:
        try:  # codes an earlier VQ-VAE made (stage 1 is training again) are not this one's
            current = run.vqvae.trained and weights_fingerprint(run.vqvae.path) == codes.get("vqvae_fingerprint")
            splits, meta = load_codes(run.codes) if current else ({}, None)
        except VQGenError:
            splits = {}
        if "test" in splits and len(splits["test"]):
            histogram = code_histogram(splits["test"].codes, meta.codebook_size, "test")
    samples = []
    if run.samples.is_dir():
        for folder in sorted(run.samples.glob("[0-9][0-9][0-9][0-9]"), reverse=True):
            sample_set = SampleSetDir(folder)
            if sample_set.grid.is_file():
                samples.append(SampleSet(folder, sample_set.grid, _config(sample_set.settings) or {}))
            if len(samples) == NEWEST_SAMPLE_SETS:
                break
    evaluations = [r for r in JsonlLog(run.evaluations).read() if isinstance(r.get("samples"), dict)]
    return Report(run.root, stages, histogram, codes, samples, evaluations[-NEWEST_EVALUATIONS:],
                  run.closest_pairs if run.closest_pairs.is_file() else None)


def sweep_points(evaluations: list[dict[str, Any]]) -> list[SweepPoint]:
    """The settings of the newest sweep (records sharing its sweep_id), as points of fidelity against variety."""
    sweeps = [r for r in evaluations if r.get("sweep_id")]
    if not sweeps:
        return []
    newest = [r for r in sweeps if r["sweep_id"] == sweeps[-1]["sweep_id"]]
    varied = [k for k in ("cfg_scale", "cfg_schedule", "temperature", "top_k", "top_p", "steps", "choice_noise")
              if len({r.get(k) for r in newest}) > 1]
    points = []
    for r in newest:
        s = r["samples"]
        if _number(s.get("precision")) and _number(s.get("recall")):
            label = ", ".join(f"{k.replace('_scale', '')} {r.get(k)}" for k in varied) or "default"
            points.append(SweepPoint(label, s["precision"], s["recall"], s.get("near_copies_pixels")))
    return points


# -- HTML ------------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1250px; color: #222; background: #fff; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .4em 1.2em .8em 0; font-size: .85em; vertical-align: top; }
td, th { border: 1px solid #ddd; padding: .15em .5em; text-align: left; }
th { background: #f3f3f3; }
.tables { display: flex; flex-wrap: wrap; align-items: flex-start; }
.pixels { image-rendering: pixelated; }
figure { margin: .6em 0 1em; } figcaption { font-size: .85em; color: #555; }
.note { color: #555; font-size: .9em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes, alt: str, width: int | None = None, pixels: bool = False) -> str:
    size = f' width="{width}"' if width else ""
    cls = ' class="pixels"' if pixels else ""
    return f'<img src="{_data_uri(png)}" alt="{_e(alt)}"{size}{cls}>'


def _shown(value: Any, limit: int = 120) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) or value is None else str(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"  # a sample set's 1000 labels, say


def _table(caption: str, fields: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(_shown(v))}</td></tr>" for k, v in fields.items()
                   if k not in ("kind", "format_version"))
    return f"<table><tr><th colspan=2>{_e(caption)}</th></tr>{rows}</table>"


def _summary(curves: Curves) -> str:
    parts = [f"latest step {curves.latest_step}"]
    if curves.best_step is not None and curves.held_metric:
        parts.insert(0, f"best evaluation: step {curves.best_step}, test {curves.held_metric} {curves.best_value:.5g}"
                        " (its weights are the stage's model.safetensors)")
    if curves.resumes:
        parts.append(f"resumed at step{'s' if len(curves.resumes) > 1 else ''} "
                     + ", ".join(map(str, curves.resumes)))
    return f'<p class="note">{_e("; ".join(parts))}</p>'


def _scaled_width(path: Path, target: int) -> int:
    """A display width for a small pixel image: a whole multiple of its width, near `target` pixels."""
    from PIL import Image

    with Image.open(path) as image:
        width = image.width
    return width * max(1, round(target / width)) if width < target else width


def render_html(report: Report) -> str:
    """The page, with every plot drawn now and every image embedded."""
    from vqgen.core.report import figures

    body = [f"<h1>vqgen run {_e(report.run)}</h1>",
            '<p class="note">Blue: training (averaged over each logging window); red: test evaluations; green '
            "dotted line: the best evaluation (the weights every later command uses); grey dashes: where a "
            "resumed run took over.</p>"]
    for stage in report.stages:
        body.append(f'<h2 id="{stage.name}">{_e(stage.title)}</h2>')
        if stage.curves:
            body.append(_summary(stage.curves))
            fig = figures.curves_figure(stage.curves)
            body.append(f"<figure>{_img(figures.png(fig), f'{stage.title}: training and test curves')}</figure>")
        else:
            body.append('<p class="note">no metrics logged yet</p>')
        for caption, path in stage.images:
            body.append(f"<figure>{_img(path.read_bytes(), caption, _scaled_width(path, 1000), pixels=True)}"
                        f"<figcaption>{_e(caption)}</figcaption></figure>")
        if stage.name == "vqvae" and report.histogram:
            fig = figures.histogram_figure(report.histogram)
            body.append(f"<figure>{_img(figures.png(fig), 'code frequencies')}<figcaption>How often each code "
                        "occurs in the test split's code grids (codes/), most frequent first.</figcaption></figure>")
        elif stage.name == "vqvae":
            body.append('<p class="note">no code frequencies: the test codes of this VQ-VAE are not dumped yet</p>')
        body.append('<div class="tables">' + "".join(_table(c, f) for c, f in stage.configs.items())
                    + (_table("code grids (codes/meta.json)", report.codes) if stage.name == "vqvae" and report.codes
                       else "") + "</div>")
    if report.evaluations:
        body.append('<h2 id="quality">Sample quality</h2>')
        body.append(_evaluations_table(report.evaluations))
        points = sweep_points(report.evaluations)
        if points:
            body.append(f"<figure>{_img(figures.png(figures.sweep_figure(points)), 'sweep: fidelity against variety')}"
                        "<figcaption>The newest sweep (<code>vqgen eval --sweep</code>): precision (fidelity) "
                        "against recall (variety) of each setting's samples; the number beside a point is its "
                        "share of near-copies of training images.</figcaption></figure>")
        if report.closest_pairs is not None:
            caption = ("the newest evaluation's samples nearest to a training image (pixels), each beside that "
                       "training image, nearest first")
            width = _scaled_width(report.closest_pairs, 800)
            pairs = _img(report.closest_pairs.read_bytes(), caption, width, pixels=True)
            body.append(f"<figure>{pairs}<figcaption>{_e(caption)}</figcaption></figure>")
    if report.samples:
        body.append('<h2 id="samples">Samples</h2>')
        for sample_set in report.samples:
            caption = f"{sample_set.path.name}: {sample_set.settings.get('n', '?')} samples (the grid shows the first)"
            shown = {k: v for k, v in sample_set.settings.items() if k not in ("command",)}
            grid = _img(sample_set.grid.read_bytes(), caption, _scaled_width(sample_set.grid, 400), pixels=True)
            body.append(f'<div class="tables"><figure>{grid}'
                        f"<figcaption>{_e(caption)}</figcaption></figure>{_table('settings.json', shown)}</div>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>vqgen report: {_e(report.run.name)}</title>"
            '<link rel="icon" href="data:,">'
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def _evaluations_table(evaluations: list[dict[str, Any]]) -> str:
    """`vqgen eval --samples` records, newest first: the settings, then each measure (mean ± std over seeds)."""
    head = ["when", "samples", "seeds", "cfg", "temperature", "steps", *(h for _, h in EVALUATION_COLUMNS),
            "FID of reconstructions", "FID of real images"]
    rows = []
    for r in reversed(evaluations):
        spread = (r.get("spread") or {}).get("samples") or {}

        def cell(part: dict, key: str, std: float | None = None) -> str:
            value = part.get(key)
            return "" if not _number(value) else f"{value:.4g}" + (f" ± {std:.2g}" if _number(std) else "")

        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.get("time", 0)))
        seeds = r.get("seeds") or [r.get("seed")]
        rows.append([when, r.get("n") or r["samples"].get("n_samples"), len(seeds), r.get("cfg_scale"),
                     r.get("temperature"), r.get("steps") or "",
                     *(cell(r["samples"], k, spread.get(k)) for k, _ in EVALUATION_COLUMNS),
                     cell(r.get("reconstructed") or {}, "fid"), cell(r.get("real") or {}, "fid")])
    header = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_e('' if v is None else v)}</td>" for v in row) + "</tr>" for row in rows)
    return (f"<table><tr>{header}</tr>{body}</table>"
            '<p class="note">In the features of the run\'s judge (<code>vqgen eval</code>), against the test split. '
            "near-copies: the share of samples nearer a training image than 95 % of held-out test images are "
            "(pixels); held-out near-copies: the same share for the other held-out images (about 5 %).</p>")


def check_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """The report's path, or a one-line error: no run, no metrics yet, a missing folder, no matplotlib."""
    from vqgen.core.report import figures

    run = RunLayout(run_dir)
    if not run.root.is_dir():
        raise VQGenError(f"run not found: {run.root}")
    if not any(JsonlLog(stage.metrics).read() for stage in (run.vqvae, run.prior)):
        raise VQGenError(f"{run.root} has no training metrics yet (no records in {run.vqvae.metrics} nor "
                         f"{run.prior.metrics}): train a stage first")
    path = Path(out) if out is not None else run.report
    if path.is_dir():
        raise VQGenError(f"report path {path} is a folder; expected an .html file to write")
    if not path.parent.is_dir():
        raise VQGenError(f"cannot write the report {path}: its folder {path.parent} does not exist")
    if not figures.available():
        raise VQGenError('the report needs matplotlib, which is not installed: pip install "vqgen[report]"')
    return path


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the report (default RUN/report.html) through a temporary file and a rename; return its path."""
    path = check_report(run_dir, out)
    page = render_html(collect(run_dir))
    tmp = None
    with writing(path, temporary=None):
        fd, tmp = temporary_file(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with writing(path, temporary=tmp):
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(tmp, path)
    return path
