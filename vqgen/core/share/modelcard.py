"""An exported model's README.md: Hugging Face Hub front matter (library, tags, task, dataset), then what the
model is, the data it learnt, its held-out metrics, its samples and how to load it.

Built from the run's JSON files alone (configs, codes metadata, metrics.jsonl, evaluations.jsonl), so it
describes exactly the files exported beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import safe_open

from vqgen.core.data.config import BUILTIN
from vqgen.core.share.hub import parse_repo_id
from vqgen.core.store.configs import read_json
from vqgen.core.store.jsonl import JsonlLog
from vqgen.core.store.layout import RunLayout

LIBRARY = "vqgen"  # the Hub's library_name, and how `vqgen` knows its own cards
PRIOR_NAMES = {"TransformerConfig": "Transformer (GPT-style, decoder-only)", "PixelCNNConfig": "gated PixelCNN"}


def model_card(run: RunLayout, files: list[str], repo: str | None = None, name: str | None = None,
               grid: bool = False) -> str:
    """The card of the model in `run` (a run directory or an exported folder): `files` are the names it is
    exported with, `repo` its Hub repo id when known, `name` the exported folder's name, `grid` whether
    samples.png is among the files."""
    vqvae = read_json(run.vqvae.config, "VQ-VAE config")
    prior = read_json(run.prior.config, "prior config")
    source = _optional(run.prior.source)
    data = _optional(run.vqvae.data_config)
    codes = _optional(run.codes_meta)
    title = repo or name or run.root.resolve().name
    where = repo or f"path/to/{name or run.root.resolve().name}"
    local = parse_repo_id(repo).local_name if repo and parse_repo_id(repo) else (name or run.root.resolve().name)
    conditioning = _conditioning(prior, source)
    classes = list(source.get("class_names") or codes.get("class_names") or [])
    conditional = prior.get("num_classes", 0) and classes and not source.get("pseudo_labels")
    label_example = f" --label {classes[0]}" if conditional else ""
    lines = [*_front_matter(prior, source, data), f"# {title}", "",
             f"A two-stage image generator trained with {LIBRARY}: a VQ-VAE that turns each "
             f"{vqvae['in_channels']}×{vqvae['image_height']}×{vqvae['image_width']} image into a grid of "
             f"{vqvae['image_height'] // vqvae['downsample']}×{vqvae['image_width'] // vqvae['downsample']} codes, "
             f"each one of {vqvae['codebook_size']} vectors of dimension {vqvae['code_dim']}, and a "
             f"{PRIOR_NAMES.get(prior.get('kind'), prior.get('kind'))} prior over those grids, {conditioning}. "
             "Sampling draws a grid from the prior, looks its codes up in the codebook and decodes them.", ""]
    if grid:
        lines += [f"![samples drawn from this model]({run.sample_grid.name})", ""]
    lines += ["## Data", "", "| source | images | classes |", "|---|---|---|",
              f"| {_data_source(data, codes)} | {_splits(codes)} | {_classes(classes, source)} |", ""]
    lines += ["## Metrics", "", "On the held-out test split; the weights here are those of the best evaluation.", "",
              "| stage | measure | value | step |", "|---|---|---|---|",
              *_stage_rows("VQ-VAE", run.vqvae.metrics, (("mse", "test MSE ([0, 1] pixels)"), ("psnr", "PSNR (dB)"),
                                                         ("usage", "share of the codebook used"))),
              *_stage_rows("prior", run.prior.metrics, (("bits_per_code", "bits per code"),
                                                        ("bits_per_image", "bits per image"))),
              *_sample_rows(run.evaluations), ""]
    lines += ["## Use it", "", f"With {LIBRARY} installed (`pip install -e .` in its repository):", "", "```bash",
              f"vqgen sample --run {where} --n 64{label_example}   # -> outputs/{local}/samples/0000/grid.png",
              f"vqgen info --run {where}                           # configs, data and metrics",
              f"vqgen eval --run {where} --samples 1000            # score samples (needs the training data)",
              "```", "",
              "`--run` takes this model's Hub repo id (`owner/name`, or `owner/name@revision`; downloaded once into "
              "the Hugging Face cache) or the path of a folder holding these files. Every file is checked against "
              "`manifest.json` before a weight is read. Commands write what they make under "
              f"`outputs/{local}/` in the working directory (`vqgen sample --out DIR` chooses the folder).", "",
              "```python", "from accelerate import Accelerator", "from vqgen.run import Run", "",
              f'run = Run.load("{where}")',
              "codes, images = run.sample(Accelerator(), 16, seed=0)  # (16, h, w) codes, (16, c, H, W) uint8",
              "```", ""]
    lines += ["## Files", "", "| file | what |", "|---|---|", *_file_rows(run, files), ""]
    lines += ["## Training", "", *_training_lines(run), ""]
    return "\n".join(lines)


def _optional(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}


def _front_matter(prior: dict, source: dict, data: dict) -> list[str]:
    kind = "transformer" if prior.get("kind") == "TransformerConfig" else "pixelcnn"
    tags = [LIBRARY, "vq-vae", "image-generation", kind]
    if prior.get("num_classes") and not source.get("pseudo_labels"):
        tags.append("class-conditional")
    lines = ["---", f"library_name: {LIBRARY}", "tags:", *[f"- {t}" for t in tags],
             "pipeline_tag: unconditional-image-generation"]
    dataset = _hub_dataset(data.get("source"))
    if dataset:
        lines += ["datasets:", f"- {dataset}"]
    return [*lines, "---", ""]


def _hub_dataset(source: str | None) -> str | None:
    """The data's Hub name when it came from the Hub (owner/name that is no local path)."""
    if not source or source == BUILTIN or Path(source).expanduser().exists() or source.startswith((".", "/", "~")):
        return None
    repo = parse_repo_id(source)
    return repo.repo_id if repo and not repo.revision else None


def _conditioning(prior: dict, source: dict) -> str:
    n = prior.get("num_classes", 0)
    if not n:
        return "unconditional"
    if source.get("pseudo_labels"):
        return f"conditioned on {n} clusters of the training codes (the data had no labels)"
    if source.get("condition_classes"):
        return (f"conditioned on {n} clusters of the training codes within {len(source.get('class_names', []))} "
                "classes (a class's clusters drawn by their shares of it; with classifier-free guidance)")
    return f"conditioned on {n} classes (with classifier-free guidance)"


def _data_source(data: dict, codes: dict) -> str:
    described = codes.get("data_source")
    given = data.get("source")
    if given == BUILTIN:
        return described or "the built-in coloured shapes"
    dataset = _hub_dataset(given)
    if dataset:
        return f"[{dataset}](https://huggingface.co/datasets/{dataset})"
    return f"`{given}`" if given else (described or "not recorded")


def _splits(codes: dict) -> str:
    sizes = codes.get("split_sizes") or []
    return ", ".join(f"{n:,} {split}" for split, n in sizes) or "not recorded"


def _classes(classes: list[str], source: dict) -> str:
    if not classes:
        return "none"
    if source.get("pseudo_labels"):
        return f"{len(classes)} clusters (`cluster0` …)"
    shown = ", ".join(classes[:20]) + (" …" if len(classes) > 20 else "")
    return f"{len(classes)}: {shown}"


def _best(metrics: Path) -> dict[str, Any] | None:
    """The test evaluation whose weights the stage kept (metrics.jsonl's best_step), else the last."""
    tests = [r for r in JsonlLog(metrics).read() if r.get("split") == "test"]
    if not tests:
        return None
    last = tests[-1]
    return next((r for r in tests if r.get("step") == last.get("best_step")), last)


def _stage_rows(stage: str, metrics: Path, measures: tuple[tuple[str, str], ...]) -> list[str]:
    best = _best(metrics)
    if best is None:
        return [f"| {stage} | not recorded | | |"]
    return [f"| {stage} | {label} | {best[key]:.4g} | {best['step']} |" for key, label in measures if key in best]


def _sample_rows(evaluations: Path) -> list[str]:
    """The newest `vqgen eval --samples` scores, when the run has any."""
    records = JsonlLog(evaluations).read()
    if not records or not isinstance(records[-1].get("samples"), dict):
        return []
    last = records[-1]
    scores, real, recon = last["samples"], last.get("real") or {}, last.get("reconstructed") or {}
    n = scores.get("n_samples", "")
    n = f"{n:g}" if isinstance(n, (int, float)) else n  # written as a float (a mean over seeds)
    schedule = "" if last.get("cfg_schedule", "constant") == "constant" else f" ({last['cfg_schedule']})"
    setting = f"{n} samples, cfg {last.get('cfg_scale')}{schedule}, seed {last.get('seed')}"
    rows = []
    for key, label in (("fid", "in-domain FID"), ("class_accuracy", "class accuracy"), ("coverage", "coverage"),
                       ("inception_fid", "Inception FID")):
        if key in scores:
            refs = [f"{what}: {part[key]:.4g}" for what, part in (("reconstructions", recon), ("real images", real))
                    if key in part]
            floor = f" ({'; '.join(refs)})" if refs else ""
            rows.append(f"| samples | {label}, {setting} | {scores[key]:.4g}{floor} | |")
    return rows


_WHAT = {"config.json": "architecture (JSON)", "model.safetensors": "weights (safetensors)",
         "train_config.json": "training options", "metrics.jsonl": "training and test metrics, one JSON line each",
         "data_config.json": "data options", "source.json": "the codes it learnt: VQ-VAE fingerprint, classes",
         "meta.json": "the code grids' metadata (K, grid, classes; the grids are not included)",
         "evaluations.jsonl": "sample-quality scores of `vqgen eval --samples`",
         "sampling.json": "the guidance the prior samples with by default, measured by `vqgen eval --adopt`",
         "samples.png": "samples drawn from this model", "README.md": "this card",
         "manifest.json": "size and sha256 of every other file, checked before loading"}


def _file_rows(run: RunLayout, files: list[str]) -> list[str]:
    rows = []
    for name in files:
        what = _WHAT.get(Path(name).name, "")
        if Path(name).name == "model.safetensors":
            count = _values(run.root / name)
            what += f", {count / 1e6:.2f} M values" if count is not None else ""
        rows.append(f"| `{name}` | {what} |")
    return rows


def _values(weights: Path) -> int | None:
    """Numbers stored in a safetensors file, read from its header."""
    if not weights.is_file():
        return None
    total = 0
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            size = 1
            for side in f.get_slice(key).get_shape():
                size *= side
            total += size
    return total


def _training_lines(run: RunLayout) -> list[str]:
    lines = []
    for stage, folder in (("VQ-VAE", run.vqvae), ("prior", run.prior)):
        train = _optional(folder.train_config)
        records = JsonlLog(folder.metrics).read()
        steps = max((r.get("step", 0) for r in records), default=None)
        best = _best(folder.metrics)
        if not train:
            continue
        lines.append(f"- {stage}: {steps if steps is not None else '?'} steps (kept step "
                     f"{best['step'] if best else '?'}), batch size {train.get('batch_size')}, learning rate "
                     f"{train.get('learning_rate')}, weight decay {train.get('weight_decay')}, "
                     f"seed {train.get('seed')}")
    return lines or ["Not recorded."]
