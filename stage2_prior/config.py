"""Stage 2's options, without torch (the command-line parsers read them): the fields every prior shares, each
prior kind's architecture (saved beside its weights as config.json), and the training defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store.configs import option


@dataclass(frozen=True)
class PriorConfig:
    """Fields every prior shares; `num_classes` is also the index of the null class."""

    codebook_size: int = option(help="K, from the codes")  # k
    grid_height: int = option(help="code grid height, from the codes")  # h
    grid_width: int = option(help="code grid width, from the codes")  # w
    num_classes: int = option(0, "classes to condition on, from the codes (0: unconditional)")
    label_dropout: float = option(0.1, "share of training labels replaced by the null class (makes --cfg work)")
    dropout: float = option(0.0, "dropout on embeddings, attention and residual paths")
    code_dropout: float = option(0.0, "share of the input codes replaced by random codes while training; the "
                                      "targets stay the true codes (0: off)", since=8)
    label_smoothing: float = option(0.0, "label smoothing of the training loss (0: off); the prior then puts "
                                         "about this share of every draw on random codes, which --top-p 1 - E "
                                         "cuts off; the held-out number stays the true negative log-likelihood",
                                    since=8)

    def __post_init__(self) -> None:
        if self.codebook_size < 2:
            raise VQGenError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.grid_height < 1 or self.grid_width < 1:
            raise VQGenError(f"grid must be at least 1x1, got {self.grid_height}x{self.grid_width}")
        if self.num_classes < 0:
            raise VQGenError(f"num_classes must be >= 0, got {self.num_classes}")
        for name in ("label_dropout", "dropout", "code_dropout", "label_smoothing"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise VQGenError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def seq_len(self) -> int:
        """t = h * w, the number of codes in one grid."""
        return self.grid_height * self.grid_width

@dataclass(frozen=True)
class TransformerConfig(PriorConfig):
    """Architecture of `TransformerPrior`; the shared prior fields come from `PriorConfig`."""

    d_model: int = option(128, "Transformer width")  # d
    n_layers: int = option(4, "Transformer blocks (the Transformer prior's are sized: 8 under the little-data "
                              "rule, docs/defaults.md); a PixelCNN's gated layers: 8 when not given")
    n_heads: int = option(4, "attention heads (must divide --d-model)")  # nh; head dim hd = d / nh
    mlp_ratio: int = option(4, "MLP width as a multiple of --d-model")
    class_modulation: bool = option(False, "also condition every block on the class: a shift and scale of its "
                                           "normalised inputs (adaptive layer norm); a conditional prior's "
                                           "default under the little-data rule", since=9)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("d_model", "n_layers", "n_heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise VQGenError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.class_modulation and not self.num_classes:
            raise VQGenError("class_modulation conditions the blocks on the class, but this prior is unconditional "
                             "(num_classes 0): train on labelled codes, or leave it off")
        if self.d_model % self.n_heads:
            raise VQGenError(
                f"d_model must be divisible by n_heads, got d_model={self.d_model}, n_heads={self.n_heads}"
            )

@dataclass(frozen=True)
class PixelCNNConfig(PriorConfig):
    """Architecture of `PixelCNNPrior`; the shared prior fields come from `PriorConfig`."""

    channels: int = option(128, "PixelCNN channels")  # c
    n_layers: int = option(8, "Transformer blocks / PixelCNN gated layers")
    kernel_size: int = option(3, "PixelCNN kernel size (odd; each layer widens the view by kernel_size // 2)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("channels", "n_layers"):
            if getattr(self, name) < 1:
                raise VQGenError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kernel_size < 3 or self.kernel_size % 2 == 0:
            raise VQGenError(f"kernel_size must be odd and >= 3, got {self.kernel_size}")

@dataclass(frozen=True)
class MaskedConfig(TransformerConfig):
    """Architecture of `MaskedPrior`: a Transformer's fields and defaults (so the two compare at equal size), its
    attention bidirectional; the shared prior fields come from `PriorConfig`."""

    @property
    def mask_id(self) -> int:
        """The [MASK] token's id: one past the last code."""
        return self.codebook_size


# Stage-2 training defaults, chosen by measurement (README, "Defaults"); any option overrides them.
TRAIN_DEFAULTS = dict(batch_size=32, learning_rate=1e-3, max_steps=1800, warmup_steps=100, eval_every=600,
                      save_every=600, weight_decay=0.1)


# The prior kinds by their name on the command line (`--prior`); `stage2_prior.registry` adds their models.
PRIOR_CONFIGS: dict[str, type[PriorConfig]] = {"transformer": TransformerConfig, "pixelcnn": PixelCNNConfig,
                                               "masked": MaskedConfig}


# Sampling: in-domain FID and class accuracy on four datasets (docs/defaults.md, "Sampling defaults"), for the
# clusters of an unlabelled folder too (docs/unlabelled.md). A prior may carry its own guidance instead, measured
# on its data by `vqgen eval --adopt` (prior/sampling.json).
DEFAULT_CFG = 1.5
CFG_SCHEDULES = ("constant", "linear")
# What `vqgen eval --adopt` scores when no setting is named: the default first (the baseline), then the best of
# each dataset measured (docs/benchmarks.md, "Guidance adopted by measurement", "Guidance at the current defaults"):
# none for OpenMoji 32 px at one scale, rising to 4 for the 10k shapes and OpenMoji 32 px, rising to 8 for small
# folders on a 4-block prior; 1.25 for 2,000 MNIST digits and 2 for 2,000 shapes with the class in every block.
ADOPT_CANDIDATES = ((DEFAULT_CFG, "constant"), (1.0, "constant"), (1.25, "constant"), (2.0, "constant"),
                    (4.0, "linear"), (8.0, "linear"))
DEFAULT_CHOICE_NOISE = 30.0  # MaskGIT uses 4.5; measured: docs/benchmarks.md, "Priors side by side"


@dataclass(frozen=True)
class SamplingConfig:
    """How codes are drawn from a prior: the same options for `vqgen sample`, `complete`, `eval` and the run
    object. What depends on the prior (top_k at most its K, a guidance scale that needs classes) is checked
    where the prior is known."""

    temperature: float = option(1.0, "softmax temperature")
    top_k: int | None = option(None, "sample among the k most likely codes")
    top_p: float | None = option(None, "nucleus sampling mass in (0, 1]")
    cfg_scale: float | None = option(None, "classifier-free guidance scale of a conditional prior, on classes or "
                                           "on the clusters of an unlabelled folder (1: off, the most varied "
                                           "samples; default: the guidance the prior adopted by `vqgen eval "
                                           f"--adopt`, else {DEFAULT_CFG:g})", flag="cfg")
    cfg_schedule: str | None = option(None, "how the guidance scale runs over a sample's draws: constant (--cfg at "
                                            "every code) or linear (from 1 at the first code drawn, or the first "
                                            "step of a masked prior, up to --cfg at the last; default: the "
                                            "prior's adopted schedule, else constant)",
                                      choices=CFG_SCHEDULES)
    steps: int | None = option(None, "masked prior: parallel decoding steps (default: 8, or fewer where fewer codes "
                                     "are to be drawn); raster priors draw one code per step")
    choice_noise: float | None = option(None, "masked prior: scale of the Gumbel noise on the confidences that "
                                              "choose which drawn codes to keep at each step, fading to 0 by the "
                                              "last step (0: the most probable first; larger: a more random "
                                              f"order; default: {DEFAULT_CHOICE_NOISE:g})")

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise VQGenError(f"steps must be >= 1, got {self.steps}")
        if not self.temperature > 0:
            raise VQGenError(f"temperature must be > 0, got {self.temperature}")
        if self.choice_noise is not None and not (self.choice_noise >= 0 and math.isfinite(self.choice_noise)):
            raise VQGenError(f"choice_noise must be a number >= 0, got {self.choice_noise}")
        if self.top_k is not None and self.top_k < 1:
            raise VQGenError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise VQGenError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.cfg_scale is not None and not self.cfg_scale >= 0:
            raise VQGenError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.cfg_schedule is not None and self.cfg_schedule not in CFG_SCHEDULES:
            raise VQGenError(f"cfg_schedule must be one of {', '.join(CFG_SCHEDULES)}, got {self.cfg_schedule!r}")

    def with_guidance(self, scale: float, schedule: str) -> SamplingConfig:
        """This config with the guidance it leaves unset (None) taken from a prior's defaults."""
        return replace(self, cfg_scale=scale if self.cfg_scale is None else self.cfg_scale,
                       cfg_schedule=schedule if self.cfg_schedule is None else self.cfg_schedule)
