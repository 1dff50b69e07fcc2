"""A trained run as one object: load it once, move it to a device once, then sample, decode, reconstruct,
complete and evaluate through its methods.

Sampling chains prior -> codebook -> decoder. Under several processes each one draws its share of the n
samples; sample i is seeded by `seed` and i alone (its codes and, when the prior draws them, its label), so the
images do not depend on how many processes drew them or in which batch.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterable, Iterator

import torch
from accelerate import Accelerator
from torch import Tensor

from stage1_vqvae.config import VQVAEConfig
from stage1_vqvae.model import VQVAE, reconstruction_errors
from stage2_prior.config import DEFAULT_CFG, SamplingConfig
from stage2_prior.parallel import check_filling, fill_masked
from stage2_prior.registry import AdoptedGuidance, PriorKind, PriorSource, kind_of, load_adopted, load_prior
from stage2_prior.sampling import check_sampling, sample_codes
from vqgen.core.data.config import DataConfig
from vqgen.core.data.images import ImageData, load_image_data, to_model_range, to_uint8
from vqgen.core.evaluate import quality, sample_metrics
from vqgen.core.evaluate.inception import inception_scores
from vqgen.core.evaluate.measures import code_usage, psnr
from vqgen.core.evaluate.quality import judging_images
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.share.export import RunLocation, locate_run
from vqgen.core.store.codes import CodeSplit, load_codes
from vqgen.core.store.configs import load_config
from vqgen.core.store.imageio import save_png
from vqgen.core.store.layout import RunLayout
from vqgen.core.store.weights import load_model, weights_fingerprint
from vqgen.draws import LabelPlan, autocast, gather_shares, sample_seeds, share


@dataclass
class Run:
    """A loaded run: its layout, its VQ-VAE and (when trained) its prior with the record of its codes.

    `outputs` is where commands write what they make: the run itself, or outputs/NAME/ for a model that is
    only read (an exported folder, a Hugging Face Hub download). Build one with `Run.load`.
    """

    layout: RunLayout
    vqvae: VQVAE
    prior: torch.nn.Module | None
    source: PriorSource | None
    outputs: RunLayout | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    adopted: AdoptedGuidance | None = None  # the guidance `vqgen eval --adopt` chose for these prior weights
    stale_adoption: bool = False            # prior/sampling.json was adopted for other weights: not used

    def __post_init__(self):
        if self.outputs is None:
            self.outputs = self.layout

    @classmethod
    def load(cls, path: str | Path | RunLocation, need_prior: bool = True, allow_vqvae_mismatch: bool = False,
             device: torch.device | str = "cpu") -> Run:
        """Load the run's VQ-VAE and (if trained or needed) its prior, checking they belong together.

        `path`: a run directory, an exported model folder or a Hub repo id `owner/name[@revision]` (see
        `vqgen.core.share.export.locate_run`); an exported model's files are checked against its manifest first.
        """
        location = locate_run(path)
        layout = location.layout
        if not layout.root.is_dir():
            raise VQGenError(f"run not found: {layout.root}")
        if not layout.vqvae.trained:
            raise VQGenError(f"{layout.root} has no trained VQ-VAE (run `vqgen train vqvae --run {layout.root}`)")
        vqvae = load_model(VQVAE, VQVAEConfig, layout.vqvae.path).eval()
        prior, source, adopted, stale = None, None, None, False
        if need_prior or layout.prior.trained:
            prior, source = load_prior(layout.prior)
            adopted = load_adopted(layout.prior)
            if adopted is not None and adopted.prior_weights != weights_fingerprint(layout.prior.path):
                adopted, stale = None, True
            own = weights_fingerprint(layout.vqvae.path)
            if source.vqvae_fingerprint != own and not allow_vqvae_mismatch:
                raise VQGenError(
                    f"the prior in {layout.prior.path} was trained on codes of VQ-VAE {source.vqvae_fingerprint}, "
                    f"but {layout.vqvae.path} holds VQ-VAE {own} (retrain the prior, or pass --allow-vqvae-mismatch)"
                )
            pc, vc = prior.config, vqvae.config
            if (pc.codebook_size, (pc.grid_height, pc.grid_width)) != (vc.codebook_size, vc.grid_shape):
                raise VQGenError(f"prior expects K={pc.codebook_size} on a {pc.grid_height}x{pc.grid_width} grid, "
                                 f"the VQ-VAE gives K={vc.codebook_size} on {vc.grid_shape[0]}x{vc.grid_shape[1]}")
        return cls(layout, vqvae, prior, source, location.outputs, adopted=adopted, stale_adoption=stale).to(device)

    def to(self, device: torch.device | str) -> Run:
        """Both models on `device`, once: every method then works there."""
        self.device = torch.device(device)
        self.vqvae.to(self.device)
        if self.prior is not None:
            self.prior.to(self.device)
        return self

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

    def need_prior(self) -> torch.nn.Module:
        if self.prior is None:
            raise VQGenError(f"this needs a trained prior; {self.layout.prior.path} has none")
        return self.prior

    @property
    def kind(self) -> PriorKind:
        """The prior's kind: raster (Transformer, PixelCNN) or masked."""
        return kind_of(self.need_prior().config)

    # -- labels ---------------------------------------------------------------------------------

    def label_ids(self, labels: list[str]) -> tuple[int, ...]:
        """Class names or integer ids -> ids, refusing unknown ones."""
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
                raise VQGenError(f"unknown label {label!r}; this run's classes are {list(names)} "
                                 f"or 0..{len(names) - 1}")
        return tuple(ids)

    def label_plan(self, names: list[str] | None, n: int, unconditional: bool = False, seed: int = 0) -> LabelPlan:
        """The labels of n samples: the named ones (one for all, or n); else, for a conditional prior, every
        class in turn, or for the clusters of unlabelled data (uneven, some maybe empty) clusters drawn as often
        as in training; none for an unconditional prior or `unconditional`."""
        if names and unconditional:
            raise VQGenError("labels and unconditional sampling exclude each other")
        if names:
            ids = self.label_ids(names)
            if len(ids) not in (1, n):
                raise VQGenError(f"got {len(ids)} labels for {n} samples: give one label or n of them")
            return LabelPlan(ids=ids)
        classes = len(self.class_names) if self.need_prior().config.num_classes else 0  # not clusters within them
        if unconditional or not classes:
            return LabelPlan()
        if self.source.pseudo_labels and self.source.class_frequencies:
            return LabelPlan(frequencies=self.source.class_frequencies, seed=seed)
        return LabelPlan(cycle=classes)

    # -- codes to images and back ---------------------------------------------------------------

    @torch.no_grad()
    def decode(self, codes: Tensor, batch_size: int = 256) -> Tensor:
        """(n, h, w) codes -> (n, c, H, W) uint8 images."""
        out = [to_uint8(self.vqvae.decode(chunk.to(self.device)).float().cpu()) for chunk in codes.split(batch_size)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8)

    @torch.no_grad()
    def encode(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """(n, c, H, W) uint8 images -> (n, h, w) codes, by the encoder alone (the codes `reconstruct` gives)."""
        out = [self.vqvae.encode(to_model_range(chunk).to(self.device)).cpu() for chunk in images.split(batch_size)]
        return torch.cat(out) if out else torch.zeros(0, *self.vqvae.config.grid_shape, dtype=torch.long)

    @torch.no_grad()
    def _reconstructions(self, batches: Iterable[Tensor]) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Per (b, c, H, W) uint8 batch: per-image MSE on [0, 1] pixels (b,), reconstructions in [-1, 1], codes.

        One encoder and one decoder pass per image: the same forward pass that stage 1 evaluates with.
        """
        for batch in batches:
            yield reconstruction_errors(self.vqvae, to_model_range(batch).to(self.device))

    def reconstruct(self, images: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor, Tensor]:
        """(n, c, H, W) uint8 -> reconstructions uint8, per-image MSE on [0, 1] pixels (n,), codes (n, h, w)."""
        recons, errors, codes = [], [], []
        for mse, recon, indices in self._reconstructions(images.split(batch_size)):
            recons.append(to_uint8(recon.cpu()))
            errors.append(mse.cpu())
            codes.append(indices.cpu())
        return torch.cat(recons), torch.cat(errors), torch.cat(codes)

    # -- sampling -------------------------------------------------------------------------------

    def guidance(self) -> tuple[float, str]:
        """The guidance (scale, schedule) the prior samples with where none is named: the one it adopted
        (`vqgen eval --adopt`), else DEFAULT_CFG at every code."""
        return (self.adopted.cfg_scale, self.adopted.cfg_schedule) if self.adopted else (DEFAULT_CFG, "constant")

    def sampling(self, sampling: SamplingConfig = SamplingConfig()) -> SamplingConfig:
        """`sampling` with the guidance it leaves unset taken from the prior (`guidance`): what is drawn with, and
        what a record of the draw names."""
        return sampling.with_guidance(*self.guidance())

    def check_sampling(self, n: int, labels: LabelPlan, sampling: SamplingConfig, batch_size: int = 1000) -> None:
        """Refuse what cannot be drawn, before anything is: one pass over a few labels, not n of them."""
        sampling = self.sampling(sampling)
        if n < 1:
            raise VQGenError(f"the number of samples must be >= 1, got {n}")
        if batch_size < 1:
            raise VQGenError(f"batch_size must be >= 1, got {batch_size}")
        first = labels.of(torch.arange(min(n, max(len(labels.ids), labels.cycle, len(labels.frequencies), 1))))
        for name in _MASKED_ONLY if self.kind.raster else ():
            if getattr(sampling, name) is not None:
                raise VQGenError(f"--{name.replace('_', '-')} {getattr(sampling, name)} applies to a masked prior; "
                                 f"{self.layout.prior.path} holds a {self.kind.name} prior, which draws one code per "
                                 "step in raster order")
        if sampling.steps is not None and sampling.steps > self.prior.config.seq_len:
            cfg = self.prior.config
            raise VQGenError(f"--steps {sampling.steps} is more than the {cfg.seq_len} codes of a "
                             f"{cfg.grid_height}x{cfg.grid_width} grid")
        count = len(first) if first is not None else 1
        first = self.source.conditions(first, torch.zeros(count, dtype=torch.long))
        if self.kind.raster:
            check_sampling(self.prior, count, first, **_raster(sampling))
        else:
            check_filling(self.prior, count, first, **asdict(sampling))

    def sample_batches(self, accelerator: Accelerator, n: int, labels: LabelPlan = LabelPlan(),
                       sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                       batch_size: int = 1000) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """This process's share of n samples, one batch at a time: (indices (b,) into the n, codes (b, h, w),
        uint8 images (b, c, H, W)). Everything is checked now, before the first batch is drawn."""
        self.check_sampling(n, labels, sampling, batch_size)
        first, last = share(n, accelerator.num_processes, accelerator.process_index)
        return self._draw(accelerator, first, last, labels, sampling, seed, batch_size)

    def _draw(self, accelerator: Accelerator, first: int, last: int, labels: LabelPlan, sampling: SamplingConfig,
              seed: int, batch_size: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for start in range(first, last, batch_size):  # the indices of one batch at a time: never n of them
            indices = torch.arange(start, min(start + batch_size, last))
            batch_labels = labels.of(indices)
            with autocast(accelerator):
                codes = self.fill(len(indices), batch_labels, sample_seeds(seed, indices), sampling)
                images = self.decode(codes, batch_size)
            yield indices, codes, images

    def fill(self, n: int, labels: Tensor | None, seeds: Tensor, sampling: SamplingConfig = SamplingConfig(),
             codes: Tensor | None = None, keep: Tensor | None = None) -> Tensor:
        """Draw n code grids (n, h, w), keeping `codes` where `keep` (n, h, w) is True (none: draw every code):
        the one call behind sample, complete, inpaint and outpaint. A raster prior draws each code seeing the
        kept codes before it in raster order (not those after); a masked prior sees every kept code. Sample i
        depends only on seeds[i] (and its own kept codes and label)."""
        prior, sampling = self.need_prior(), self.sampling(sampling)
        labels = None if labels is None else self.source.conditions(labels.to(self.device), seeds)
        if self.kind.raster:
            out = sample_codes(prior, n, labels=labels, seeds=seeds, prefix=codes, keep=keep, **_raster(sampling))
        else:
            out = fill_masked(prior, n, codes=codes, keep=keep, labels=labels, seeds=seeds, **asdict(sampling))
        return out.cpu()

    def round_trip(self, codes: Tensor, images: Tensor) -> float:
        """The share of (n, h, w) codes that the encoder gives back from their decoded uint8 images: how well
        the decoder renders them. Codes of real images score high; a prior that draws combinations the decoder
        cannot render (speckle, holes) scores lower, also where a judge's features do not see it."""
        return float((self.encode(images) == codes.cpu()).double().mean())

    def sample(self, accelerator: Accelerator, n: int, labels: LabelPlan = LabelPlan(),
               sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
               batch_size: int = 1000) -> tuple[Tensor, Tensor]:
        """n samples -> ((n, h, w) codes, (n, c, H, W) uint8 images), split across processes, identical on all.

        Holds all n in memory; `sample_batches` streams them.
        """
        cfg = self.vqvae.config
        codes = [torch.zeros(0, *cfg.grid_shape, dtype=torch.long)]
        images = [torch.zeros(0, cfg.in_channels, cfg.image_height, cfg.image_width, dtype=torch.uint8)]
        for _, batch_codes, batch_images in self.sample_batches(accelerator, n, labels, sampling, seed, batch_size):
            codes.append(batch_codes)
            images.append(batch_images)
        codes, images = torch.cat(codes), torch.cat(images)
        if accelerator.num_processes > 1:
            sizes = [last - first for first, last in (share(n, accelerator.num_processes, i)
                                                       for i in range(accelerator.num_processes))]
            codes, images = gather_shares(accelerator, codes, images, sizes=sizes)
        return codes, images

    def complete(self, codes: Tensor, keep_rows: int, labels: Tensor | None, seed: int = 0,
                 sampling: SamplingConfig = SamplingConfig()) -> tuple[Tensor, Tensor]:
        """Keep the first `keep_rows` rows of each (n, h, w) grid and sample the rest -> (codes, images)."""
        h, w = codes.shape[1:]
        if not 0 <= keep_rows <= h:
            raise VQGenError(f"keep_rows must be in [0, {h}] for a {h}x{w} grid, got {keep_rows}")
        keep = torch.zeros(codes.shape, dtype=torch.bool)
        keep[:, :keep_rows] = True
        out = self.fill(len(codes), labels, sample_seeds(seed, torch.arange(len(codes))), sampling, codes, keep)
        return out, self.decode(out)

    # -- data and evaluation --------------------------------------------------------------------

    def data(self, override: DataConfig | None = None) -> ImageData:
        """The dataset the run was trained on (or `override`)."""
        return load_image_data(override or load_config(DataConfig, self.layout.vqvae.data_config))

    @torch.no_grad()
    def evaluate(self, data: ImageData | None = None, batch_size: int = 256) -> dict[str, float]:
        """Test metrics of both stages: reconstruction MSE/PSNR and code usage; the prior's bits per code."""
        data = data or self.data()
        n = len(data.test)  # taken a batch at a time: a streamed split is never decoded whole
        batches = (data.test.take(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size))
        errors, codes = [], []
        for mse, _, indices in self._reconstructions(batches):
            errors.append(mse.cpu())
            codes.append(indices.cpu())
        errors, codes = torch.cat(errors), torch.cat(codes)
        counts = torch.bincount(codes.flatten(), minlength=self.vqvae.config.codebook_size)
        mse = errors.mean().item()
        metrics = {"mse": mse, "psnr": psnr(mse), **code_usage(counts)}
        test = None
        if self.prior is not None and not self.read_only:
            test = load_codes(self.layout.codes)[0]["test"]
        elif self.prior is not None and not (self.source.pseudo_labels or self.source.condition_classes):
            test = CodeSplit(codes, data.test.labels)  # an exported model carries no code grids: encoded now
        if test is not None and len(test):
            conditional = self.prior.config.num_classes > 0
            if conditional and (test.conditions is not None) != bool(self.source.condition_classes):
                raise VQGenError(f"the prior in {self.layout.prior.path} and the codes in {self.layout.codes} "
                                 "disagree on clusters within classes (re-run `vqgen encode`, then train the prior)")
            batches = ((test.codes[i:i + batch_size].to(self.device).long(),
                        test.condition_ids[i:i + batch_size].to(self.device) if conditional else None,
                        torch.arange(i, min(i + batch_size, len(test)), device=self.device))
                       for i in range(0, len(test), batch_size))
            metrics.update(self.kind.held_out(self.prior, self.prior.config, batches, lambda x: x))
        return metrics

    def judge(self, data: ImageData, retrain: bool = False, steps: int | None = None) -> quality.Judge:
        """The run's judge: trained once on its training images (their labels, or rotations when unlabelled;
        `steps`, default `quality.JUDGE_STEPS`), then cached in the run directory (or, for a model that is only
        read, in its outputs folder)."""
        return quality.run_judge(self.outputs.judge, data, self.device, retrain, steps)

    def sample_quality(self, accelerator: Accelerator, n: int, data: ImageData | None = None,
                       sampling: SamplingConfig = SamplingConfig(), seed: int = 0, batch_size: int = 1000,
                       retrain_judge: bool = False, inception: bool = False, judge_steps: int | None = None,
                       closest_pairs: str | Path | None = None) -> dict[str, dict[str, float]]:
        """How good n samples are against the test split, beside what n real training images score.

        -> {"samples": {fid, class_accuracy, coverage, ...}, "reconstructed": {...}, "real": {...}}: in-domain
        FID in the features of the run's judge, the share of samples the judge assigns the class they were
        drawn for, and the normalised entropy of its predicted classes; `inception` adds the standard
        Inception FID. "reconstructed" scores the VQ-VAE's reconstructions of the same n training images
        that "real" scores: what samples would reach with a perfect prior, so the gap between the three says
        which stage holds the samples back. KID, precision/recall and density/coverage_nn come with each;
        near_copies* (samples and reconstructions) are the shares of near-copies of a training image, in the
        judge's features and in pixels, beside near_copies_heldout* (what new test images score, ~5 %).
        code_round_trip (samples and reconstructions): the share of their codes that survive decoding and
        encoding again (`round_trip`); samples well below the reconstructions hold codes the decoder cannot
        render.
        closest_pairs: a PNG path for the samples nearest to a training image (pixels), each beside it.
        """
        self.need_prior()
        data = data or self.data()
        if len(data.test) < 2:
            raise VQGenError(f"judging samples needs a test split of at least 2 images, {data.source} has "
                             f"{len(data.test)}")
        if inception and importlib.util.find_spec("torch_fidelity") is None:
            raise VQGenError("the Inception FID needs torch-fidelity: pip install torch-fidelity "
                             "(and network access once for its Inception weights)")
        judge = self.judge(data, retrain_judge, judge_steps)
        labels = self.label_plan(None, n, seed=seed)
        codes, images = self.sample(accelerator, n, labels, sampling, seed, batch_size)
        drawn = labels.of(torch.arange(n))
        judged_labels = None if self.source.pseudo_labels else drawn  # clusters are not the judge's classes
        test_images, test_labels = judging_images(data.test, seed=seed)
        train_images, train_labels = judging_images(data.train, seed=seed)
        reference = quality.reference_of(judge, test_images.to(self.device), test_labels)
        scores = quality.sample_quality(judge, images.to(self.device), judged_labels, reference)
        scores["code_round_trip"] = self.round_trip(codes, images)
        floor = partial(quality.reference_floor, judge, train_images.to(self.device), reference,
                        n=min(n, len(train_images)), seed=seed, train_labels=train_labels)
        real = floor()
        made = []  # (reconstructions, errors, codes) of the images the floor scores, for near-copies and round trip
        reconstructed = floor(transform=lambda x: made.append(self.reconstruct(x)) or made[-1][0])
        reconstructed["code_round_trip"] = self.round_trip(made[0][2], made[0][0])
        if len(test_images) >= 4:  # two held-out halves of >= 2: one sets the threshold, one checks it
            (copies, found), (copied, _) = quality.memorisation_scores(
                judge, [images.to(self.device), made[0][0].to(self.device)], train_images.to(self.device),
                test_images.to(self.device), seed)
            scores.update(copies)
            reconstructed.update(copied)
            if closest_pairs is not None and accelerator.is_main_process:
                save_png(sample_metrics.closest_pairs_grid(images, train_images, found["pixels"]), closest_pairs)
        if inception:
            scores.update({f"inception_{k}": v for k, v in inception_scores(images, test_images).items()})
        return {"samples": scores, "reconstructed": reconstructed, "real": real}


_MASKED_ONLY = ("steps", "choice_noise")  # sampling options of parallel decoding, refused for a raster prior


def _raster(sampling: SamplingConfig) -> dict:
    """The options a raster prior's sampler takes (all but the masked prior's own)."""
    return {k: v for k, v in asdict(sampling).items() if k not in _MASKED_ONLY}
