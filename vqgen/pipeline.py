"""A trained run as one object: load it, sample, reconstruct, complete, evaluate.

Sampling chains prior -> codebook -> decoder. Under several processes each one draws its
share of the n samples; sample i is seeded by `seed` and i alone, so the images do not
depend on how many processes drew them.
"""

from __future__ import annotations

import importlib.util
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from accelerate import Accelerator
from torch import Tensor

from stage1_vqvae.model import VQVAE, VQVAEConfig, reconstruction_errors
from stage2_prior.contract import grid_nll
from stage2_prior.registry import PriorSource, load_prior
from stage2_prior.sampling import check_sampling, sample_codes
from vqgen.core.checkpoint import load_model, weights_fingerprint
from vqgen.core.codes import CodeSplit, load_codes
from vqgen.core.config import load_config
from vqgen.core.data.config import DataConfig
from vqgen.core.data.images import ImageData, ImageSplit, load_image_data, to_model_range, to_uint8
from vqgen.core.errors import VQGenError
from vqgen.core.export import locate_run
from vqgen.core.layout import RunLayout
from vqgen.core.metrics import bits, code_usage, psnr
from vqgen.core import quality, sample_metrics
from vqgen.core.imageio import save_png


@dataclass
class Run:
    """A loaded run: its layout, its VQ-VAE and (when trained) its prior with the record of its codes.

    `outputs` is where commands write what they make: the run itself, or outputs/NAME/ for a model that is
    only read (an exported folder, a Hugging Face Hub download).
    """

    layout: RunLayout
    vqvae: VQVAE
    prior: torch.nn.Module | None
    source: PriorSource | None
    outputs: RunLayout | None = None

    def __post_init__(self):
        if self.outputs is None:
            self.outputs = self.layout

    @property
    def read_only(self) -> bool:
        """An exported model or a Hub download: its folder is never written into."""
        return self.outputs != self.layout

    @property
    def path(self) -> Path:
        return self.layout.root

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.source.class_names if self.source else ()

    def label_ids(self, labels: list[str]) -> Tensor:
        """Class names or integer ids -> (n,) int64 ids, refusing unknown ones."""
        names = self.class_names
        if not names:
            raise VQGenError(f"labels given but the prior in {self.layout.prior.path} is unconditional")
        ids = []
        for label in labels:
            if label in names:
                ids.append(names.index(label))
            elif label.lstrip("-").isdigit() and 0 <= int(label) < len(names):
                ids.append(int(label))
            else:
                raise VQGenError(f"unknown label {label!r}; this run's classes are {list(names)} or 0..{len(names) - 1}")
        return torch.tensor(ids, dtype=torch.long)


def load_run(path: str | Path, need_prior: bool = True, allow_vqvae_mismatch: bool = False) -> Run:
    """Load the run's VQ-VAE and (if trained or needed) its prior, checking they belong together.

    `path`: a run directory, an exported model folder or a Hub repo id `owner/name[@revision]` (see
    `vqgen.core.export.locate_run`); an exported model's files are checked against its manifest first.
    """
    location = locate_run(path)
    layout = location.layout
    if not layout.root.is_dir():
        raise VQGenError(f"run not found: {layout.root}")
    if not layout.vqvae.trained:
        raise VQGenError(f"{layout.root} has no trained VQ-VAE (run `python scripts/train_vqvae.py --run {layout.root}`)")
    vqvae = load_model(VQVAE, VQVAEConfig, layout.vqvae.path).eval()
    prior, source = None, None
    if need_prior or layout.prior.trained:
        prior, source = load_prior(layout.prior)
        own = weights_fingerprint(layout.vqvae.path)
        if source.vqvae_fingerprint != own and not allow_vqvae_mismatch:
            raise VQGenError(
                f"the prior in {layout.prior.path} was trained on codes of VQ-VAE {source.vqvae_fingerprint}, but "
                f"{layout.vqvae.path} holds VQ-VAE {own} (retrain the prior, or pass --allow-vqvae-mismatch)"
            )
        pc, vc = prior.config, vqvae.config
        if (pc.codebook_size, (pc.grid_height, pc.grid_width)) != (vc.codebook_size, vc.grid_shape):
            raise VQGenError(f"prior expects K={pc.codebook_size} on a {pc.grid_height}x{pc.grid_width} grid, the "
                             f"VQ-VAE gives K={vc.codebook_size} on {vc.grid_shape[0]}x{vc.grid_shape[1]}")
    return run_on_device(Run(layout, vqvae, prior, source, location.outputs))


def run_on_device(run: Run, device: torch.device | str = "cpu") -> Run:
    run.vqvae.to(device)
    if run.prior is not None:
        run.prior.to(device)
    return run


def autocast(accelerator: Accelerator):
    return accelerator.autocast() if accelerator.mixed_precision != "no" else nullcontext()


@torch.no_grad()
def decode_codes(run: Run, codes: Tensor, batch_size: int = 256) -> Tensor:
    """(n, h, w) codes -> (n, c, H, W) uint8 images."""
    device = next(run.vqvae.parameters()).device
    out = [to_uint8(run.vqvae.decode(chunk.to(device)).float().cpu()) for chunk in codes.split(batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8)


def choose_labels(run: Run, names: list[str] | None, n: int, unconditional: bool = False,
                  seed: int = 0) -> Tensor | None:
    """The n labels to sample with: the named ones; else, for a conditional prior, every class in turn,
    or for clusters of unlabelled data (uneven, some maybe empty) clusters drawn as often as in training."""
    if names and unconditional:
        raise VQGenError("labels and unconditional sampling exclude each other")
    if names:
        return expand_labels(run.label_ids(names), n)
    classes = run.prior.config.num_classes
    if unconditional or not classes:
        return None
    if run.source.pseudo_labels and run.source.class_frequencies:
        weights = torch.tensor(run.source.class_frequencies, dtype=torch.double)
        return torch.multinomial(weights, n, replacement=True, generator=torch.Generator().manual_seed(seed))
    return torch.arange(n) % classes


def expand_labels(labels: Tensor | None, n: int) -> Tensor | None:
    """One label for all n samples, or exactly n of them."""
    if labels is None:
        return None
    if len(labels) == 1:
        return labels.expand(n).clone()
    if len(labels) != n:
        raise VQGenError(f"got {len(labels)} labels for {n} samples: give one label or n of them")
    return labels


def sample_batches(
    run: Run,
    accelerator: Accelerator,
    n: int,
    labels: Tensor | None = None,
    seed: int = 0,
    batch_size: int = 1000,
    **sampling: float | int | None,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """This process's share of n samples, one batch at a time: (indices (b,) into the n, codes (b, h, w),
    uint8 images (b, c, H, W)). Every option is checked now, before the first batch is drawn."""
    if n < 1:
        raise VQGenError(f"the number of samples must be >= 1, got {n}")
    if batch_size < 1:
        raise VQGenError(f"batch_size must be >= 1, got {batch_size}")
    labels = expand_labels(labels, n)
    check_sampling(run.prior, n, labels, **sampling)
    mine = torch.arange(n).tensor_split(accelerator.num_processes)[accelerator.process_index]
    return _draw(run, accelerator, mine, labels, seed, batch_size, sampling)


def _draw(run: Run, accelerator: Accelerator, mine: Tensor, labels: Tensor | None, seed: int, batch_size: int,
          sampling: dict) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    for indices in mine.split(batch_size):
        seeds = seed * 1_000_003 + indices  # sample i depends on (seed, i) alone
        batch_labels = None if labels is None else labels[indices].to(accelerator.device)
        with autocast(accelerator):
            codes = sample_codes(run.prior, len(indices), labels=batch_labels, seeds=seeds, **sampling).cpu()
            images = decode_codes(run, codes, batch_size)
        yield indices, codes, images


def sample(
    run: Run,
    accelerator: Accelerator,
    n: int,
    labels: Tensor | None = None,
    seed: int = 0,
    batch_size: int = 1000,
    progress: Callable[[int], None] | None = None,
    **sampling: float | int | None,
) -> tuple[Tensor, Tensor]:
    """n samples -> ((n, h, w) codes, (n, c, H, W) uint8 images), split across processes, identical on all.

    Holds all n in memory; `sample_batches` streams them.
    """
    cfg = run.vqvae.config
    h, w = cfg.grid_shape
    codes = [torch.zeros(0, h, w, dtype=torch.long)]
    images = [torch.zeros(0, cfg.in_channels, cfg.image_height, cfg.image_width, dtype=torch.uint8)]
    for _, batch_codes, batch_images in sample_batches(run, accelerator, n, labels, seed, batch_size, **sampling):
        codes.append(batch_codes)
        images.append(batch_images)
        if progress is not None:
            progress(len(batch_codes))
    codes, images = torch.cat(codes), torch.cat(images)
    if accelerator.num_processes > 1:
        shares = torch.arange(n).tensor_split(accelerator.num_processes)
        codes, images = _gather_shares(accelerator, codes, images, sizes=[len(s) for s in shares])
    return codes, images


def _gather_shares(accelerator: Accelerator, *parts: Tensor, sizes: list[int]) -> list[Tensor]:
    """Gather uneven per-process shares back into one tensor each, in sample order."""
    largest = max(sizes)
    out = []
    for part in parts:
        padded = torch.zeros(largest, *part.shape[1:], dtype=part.dtype)
        padded[: len(part)] = part
        gathered = accelerator.gather(padded.to(accelerator.device)).cpu()
        gathered = gathered.reshape(accelerator.num_processes, largest, *part.shape[1:])
        out.append(torch.cat([gathered[i, :size] for i, size in enumerate(sizes)]))
    return out


def run_data(run: Run, override: DataConfig | None = None) -> ImageData:
    """The dataset the run was trained on (or `override`)."""
    return load_image_data(override or load_config(DataConfig, run.layout.vqvae.data_config))


@torch.no_grad()
def _reconstructions(run: Run, batches: Iterable[Tensor]) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Per (b, c, H, W) uint8 batch: per-image MSE on [0, 1] pixels (b,), reconstructions in [-1, 1], codes.

    One encoder and one decoder pass per image: the same forward pass that stage 1 evaluates with.
    """
    device = next(run.vqvae.parameters()).device
    for batch in batches:
        yield reconstruction_errors(run.vqvae, to_model_range(batch).to(device))


def reconstruct(run: Run, images: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """(n, c, H, W) uint8 -> reconstructions uint8, per-image MSE on [0, 1] pixels (n,), codes (n, h, w)."""
    recons, errors, codes = [], [], []
    for mse, recon, indices in _reconstructions(run, images.split(batch_size)):
        recons.append(to_uint8(recon.cpu()))
        errors.append(mse.cpu())
        codes.append(indices.cpu())
    return torch.cat(recons), torch.cat(errors), torch.cat(codes)


def complete(run: Run, codes: Tensor, keep_rows: int, labels: Tensor | None, seed: int = 0,
             **sampling: float | int | None) -> tuple[Tensor, Tensor]:
    """Keep the first `keep_rows` rows of each (n, h, w) grid and sample the rest -> (codes, images)."""
    h, w = codes.shape[1:]
    if not 0 <= keep_rows <= h:
        raise VQGenError(f"keep_rows must be in [0, {h}] for a {h}x{w} grid, got {keep_rows}")
    seeds = seed * 1_000_003 + torch.arange(len(codes), dtype=torch.long)
    out = sample_codes(run.prior, len(codes), labels=labels, seeds=seeds, prefix=codes,
                       prefix_len=keep_rows * w, **sampling)
    return out, decode_codes(run, out)


@torch.no_grad()
def evaluate(run: Run, data: ImageData | None = None, batch_size: int = 256) -> dict[str, float]:
    """Test metrics of both stages: reconstruction MSE/PSNR and code usage; the prior's bits per code."""
    data = data or run_data(run)
    n = len(data.test)  # taken a batch at a time: a streamed split is never decoded whole
    batches = (data.test.take(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size))
    errors, codes = [], []
    for mse, _, indices in _reconstructions(run, batches):
        errors.append(mse.cpu())
        codes.append(indices.cpu())
    errors, codes = torch.cat(errors), torch.cat(codes)
    counts = torch.bincount(codes.flatten(), minlength=run.vqvae.config.codebook_size)
    mse = errors.mean().item()
    metrics = {"mse": mse, "psnr": psnr(mse), **code_usage(counts)}
    test = None
    if run.prior is not None and not run.read_only:
        test = load_codes(run.layout.codes)[0]["test"]
    elif run.prior is not None and not run.source.pseudo_labels:  # an exported model carries no code grids:
        test = CodeSplit(codes, data.test.labels)                  # the test images' codes, just encoded
    if test is not None and len(test):
        conditional = run.prior.config.num_classes > 0
        nll = []
        for i in range(0, len(test), batch_size):
            labels = test.labels[i:i + batch_size] if conditional else None
            nll.append(grid_nll(run.prior, test.codes[i:i + batch_size], labels))
        per_grid = bits(torch.cat(nll).mean().item())
        metrics.update(bits_per_code=per_grid / test.codes[0].numel(), bits_per_image=per_grid)
    return metrics


JUDGING_IMAGES = 20_000  # of a streamed split, for the judge and the FID references


def judging_images(split: ImageSplit, seed: int) -> tuple[Tensor, Tensor | None]:
    """A split's images and labels for training the judge and as FID references: all of an in-memory
    split; of a streamed one (larger than memory), a seeded random JUDGING_IMAGES of them, in order."""
    if not split.streamed or len(split) <= JUDGING_IMAGES:
        return split.images, split.labels
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:JUDGING_IMAGES].sort().values
    return split.take(idx), None if split.labels is None else split.labels[idx]


def judge_of(run: Run, data: ImageData, retrain: bool = False, device: torch.device | str = "cpu",
             steps: int = 600) -> quality.Judge:
    """The run's judge: trained once on its training images (their labels, or rotations when unlabelled),
    then cached in the run directory (or, for a model that is only read, in its outputs folder)."""
    folder = run.outputs.judge
    if folder.trained and not retrain:
        judge = quality.load_judge(folder.path)
        if (judge.config.in_channels, judge.config.image_height, judge.config.image_width) == (
                data.channels, data.height, data.width):
            return judge.to(device)
    images, labels = judging_images(data.train, seed=0)
    images, labels = images.to(device), None if labels is None else labels.to(device)
    config = quality.JudgeConfig.for_data(images, labels, data.num_classes or None, steps=steps)
    judge = quality.train_judge(images, labels, config)
    quality.save_judge(judge, folder.path)
    return judge


def sample_quality(run: Run, accelerator: Accelerator, n: int, data: ImageData | None = None, seed: int = 0,
                   batch_size: int = 1000, retrain_judge: bool = False, inception: bool = False,
                   judge_steps: int = 600, closest_pairs: str | Path | None = None,
                   **sampling: float | int | None) -> dict[str, dict[str, float]]:
    """How good n samples are against the test split, beside what n real training images score.

    -> {"samples": {fid, class_accuracy, coverage, ...}, "reconstructed": {...}, "real": {...}}: in-domain
    FID in the features of the run's judge, the share of samples the judge assigns the class they were
    drawn for, and the normalised entropy of its predicted classes; `inception` adds the standard
    Inception FID. "reconstructed" scores the VQ-VAE's reconstructions of the same n training images
    that "real" scores: what samples would reach with a perfect prior, so the gap between the three says
    which stage holds the samples back. KID, precision/recall and density/coverage_nn come with each;
    near_copies* (samples and reconstructions) are the shares of near-copies of a training image, in the
    judge's features and in pixels, beside near_copies_heldout* (what new test images score, ~5 %).
    closest_pairs: a PNG path for the samples nearest to a training image (pixels), each beside it.
    """
    if run.prior is None:
        raise VQGenError(f"judging samples needs a trained prior; {run.layout.prior.path} has none")
    data = data or run_data(run)
    if len(data.test) < 2:
        raise VQGenError(f"judging samples needs a test split of at least 2 images, {data.source} has {len(data.test)}")
    if inception and importlib.util.find_spec("torch_fidelity") is None:
        raise VQGenError("the Inception FID needs torch-fidelity: pip install torch-fidelity "
                         "(and network access once for its Inception weights)")
    judge = judge_of(run, data, retrain_judge, accelerator.device, judge_steps)
    labels = choose_labels(run, None, n, seed=seed)
    _, images = sample(run, accelerator, n, labels=labels, seed=seed, batch_size=batch_size, **sampling)
    device = accelerator.device
    judged_labels = None if run.source.pseudo_labels else labels  # clusters are not the judge's classes
    test_images, test_labels = judging_images(data.test, seed=seed)
    train_images, train_labels = judging_images(data.train, seed=seed)
    reference = quality.reference_of(judge, test_images.to(device), test_labels)
    scores = quality.sample_quality(judge, images.to(device), judged_labels, reference)
    floor = partial(quality.reference_floor, judge, train_images.to(device), reference,
                    n=min(n, len(train_images)), seed=seed, train_labels=train_labels)
    real = floor()
    made = []  # the reconstructions the floor scores, kept for their near-copies
    reconstructed = floor(transform=lambda x: made.append(reconstruct(run, x)[0]) or made[-1])
    # --- near-copies of training images (vqgen.core.sample_metrics) ---
    if len(test_images) >= 4:  # two held-out halves of >= 2: one sets the threshold, one checks it
        (copies, found), (copied, _) = quality.memorisation_scores(
            judge, [images.to(device), made[0].to(device)], train_images.to(device), test_images.to(device), seed)
        scores.update(copies)
        reconstructed.update(copied)
        if closest_pairs is not None and accelerator.is_main_process:
            save_png(sample_metrics.closest_pairs_grid(images, train_images, found["pixels"]), closest_pairs)
    # --- end near-copies ---
    if inception:
        scores["inception_fid"] = quality.inception_fid(images, test_images)
    return {"samples": scores, "reconstructed": reconstructed, "real": real}
