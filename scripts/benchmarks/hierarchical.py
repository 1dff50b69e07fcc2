"""Hierarchical codes (VQ-VAE-2, Razavi et al. 2019) at small scale: do two levels of codes help the prior?

    python scripts/benchmarks/hierarchical.py train --run RUN --out OUT [--top-codes 512]
    python scripts/train_prior.py --run OUT --allow-vqvae-mismatch
    python scripts/benchmarks/hierarchical.py score --run RUN --out OUT [--samples 1000] [--seeds 0,1]

`train` trains a two-level VQ-VAE on RUN's data with RUN's stage-1 settings (its model config, training
config and data options; only the model differs) into OUT/two_level, with the shared training loop: a
bottom grid at RUN's downsampling, a top grid at half its side that the bottom encoder's features are
further encoded to, the top level decoded to the bottom grid's side and fed to the bottom quantizer's input
beside the bottom features (so the bottom codes carry what the top ones do not), and one decoder reading
both levels. Then it encodes every split to OUT/codes as one grid per image: the top codes (ids K ...)
in raster order in the first rows, then the bottom grid, with RUN's labels, as the coarse-first benchmark
lays them out. One raster Transformer over that sequence is the pair of VQ-VAE-2 priors, top then bottom
given top. `score` samples OUT's prior keeping each position to its level's codes, decodes both levels,
and scores samples and reconstructions with RUN's judge as `vqgen eval` does (in-domain FID, class
accuracy, coverage, precision/recall, near-copies, the code round trip), so they sit beside RUN's own
`vqgen eval`. Results go to OUT/hierarchical.json and are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from stage1_vqvae.config import VQVAEConfig
from stage1_vqvae.model import Decoder, Encoder, ResBlock, VQVAEOutput, reconstruction_errors
from stage1_vqvae.quantizer import QuantizerOutput, VectorQuantizer
from stage1_vqvae.train import VQVAETask
from vqgen.arguments import exit_code
from vqgen.core.data.config import DataConfig
from vqgen.core.data.images import ImageDataset, load_image_data, to_model_range, to_uint8
from vqgen.core.data.loaders import make_loader
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store.codes import CodesWriter, load_codes
from vqgen.core.store.configs import load_config, save_config
from vqgen.core.store.layout import ModelDir, RunLayout
from vqgen.core.store.weights import load_weights, weights_fingerprint
from vqgen.core.training.config import TrainConfig
from vqgen.core.training.loop import fit, make_optimizer
from vqgen.core.training.setup import start

sys.path.insert(0, str(Path(__file__).parent))
from coarse_first import add_score_options, score_stacked, stacked  # noqa: E402  (a sibling script)

STAGE = "two_level"


def check_two_level(cfg: VQVAEConfig) -> None:
    """Refuse a stage-1 config the two-level model cannot be built from, in one line."""
    h, w = cfg.grid_shape
    if cfg.architecture != "paper":
        raise VQGenError(f"the two-level VQ-VAE is built from the paper's convnet, got architecture "
                         f"{cfg.architecture!r} (train RUN with --architecture paper)")
    if h % 2 or w % 2 or (h // 2) * (w // 2) % w:
        raise VQGenError(f"a {h}x{w} bottom grid has no top grid of half its side that fills whole rows of {w} "
                         "codes (expected an even side, e.g. 8x8)")


class TwoLevelVQVAE(nn.Module):
    """(b, c, H, W) -> a top grid (H/2f, W/2f) and a bottom grid (H/f, W/f) of codes -> (b, c, H, W).

    The bottom encoder is the paper's, ending in `hidden_channels` features; the top encoder halves their
    side once more and quantizes them with a codebook of its own; the top decoder brings the top vectors
    back to the bottom side, where they join the bottom features before the bottom quantizer; the decoder
    (the paper's) reads the bottom vectors beside the upsampled top ones. Loss: MSE + both quantizers'
    codebook + beta * commitment terms. `config` is the bottom level's, so the stage-1 task reads it
    unchanged (its usage numbers are the bottom codebook's).
    """

    def __init__(self, cfg: VQVAEConfig, top_codebook_size: int):
        super().__init__()
        check_two_level(cfg)
        self.config, self.top_codebook_size = cfg, top_codebook_size
        ch, d, rc, n = cfg.hidden_channels, cfg.code_dim, cfg.res_channels, cfg.num_res_blocks

        def quantizer(k: int) -> VectorQuantizer:
            return VectorQuantizer(k, d, beta=cfg.beta, update=cfg.codebook_update, ema_decay=cfg.ema_decay,
                                   kmeans_init=cfg.kmeans_init, restart_after=cfg.restart_after,
                                   lookup_dim=cfg.code_lookup_dim)

        self.bottom_encoder = Encoder(dataclasses.replace(cfg, code_dim=ch))
        self.top_encoder = nn.Sequential(
            nn.ReLU(), nn.Conv2d(ch, ch, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1),
            *[ResBlock(ch, rc) for _ in range(n)], nn.ReLU(), nn.Conv2d(ch, d, 1))
        self.top_quantizer = quantizer(top_codebook_size)
        self.top_decoder = nn.Sequential(
            nn.Conv2d(d, ch, 3, padding=1), *[ResBlock(ch, rc) for _ in range(n)], nn.ReLU(),
            nn.ConvTranspose2d(ch, d, 4, stride=2, padding=1))
        self.bottom_in = nn.Conv2d(ch + d, d, 1)
        self.quantizer = quantizer(cfg.codebook_size)
        self.top_up = nn.ConvTranspose2d(d, d, 4, stride=2, padding=1)
        self.decoder = Decoder(dataclasses.replace(cfg, code_dim=2 * d))

    @property
    def top_rows(self) -> int:
        h, w = self.config.grid_shape
        return (h // 2) * (w // 2) // w

    def levels(self, x: Tensor) -> tuple[QuantizerOutput, QuantizerOutput]:
        """(b, c, H, W) -> the top and the bottom quantizer's outputs: the encoders and quantizers alone."""
        features = self.bottom_encoder(x)
        top = self.top_quantizer(self.top_encoder(features))
        bottom = self.quantizer(self.bottom_in(torch.cat([features, self.top_decoder(top.z_q)], 1)))
        return top, bottom

    def forward(self, x: Tensor) -> VQVAEOutput:
        top, bottom = self.levels(x)
        recon = self.decode_vectors(top.z_q, bottom.z_q)
        recon_loss = F.mse_loss(recon.float(), x.float())
        quant = dataclasses.replace(bottom, loss=bottom.loss + top.loss)
        return VQVAEOutput(recon=recon, loss=recon_loss + quant.loss, recon_loss=recon_loss, quant=quant)

    def decode_vectors(self, z_top: Tensor, z_bottom: Tensor) -> Tensor:
        """(b, d, h/2, w/2) top and (b, d, h, w) bottom vectors -> (b, c, H, W) in [-1, 1] (not clamped)."""
        return self.decoder(torch.cat([z_bottom, self.top_up(z_top)], 1))

    def stack(self, top: Tensor, bottom: Tensor) -> Tensor:
        """(n, h/2, w/2) top and (n, h, w) bottom codes -> (n, h + top_rows, w): the top codes (ids K ...) in
        raster order in the first rows, then the bottom grid."""
        return stacked(top, bottom, self.config.codebook_size, self.config.grid_shape[1])

    def unstack(self, grids: Tensor) -> tuple[Tensor, Tensor]:
        """The inverse of `stack`; codes outside their level's range are refused."""
        h, w = self.config.grid_shape
        k, kt = self.config.codebook_size, self.top_codebook_size
        if tuple(grids.shape[1:]) != (h + self.top_rows, w):
            raise VQGenError(f"expected stacked grids (n, {h + self.top_rows}, {w}), got {tuple(grids.shape)}")
        flat = rearrange(grids.long(), "n h w -> n (h w)")
        top, bottom = flat[:, : self.top_rows * w] - k, flat[:, self.top_rows * w:]
        if top.numel() and (int(top.min()) < 0 or int(top.max()) >= kt):
            raise VQGenError(f"top codes must lie in [{k}, {k + kt}), got [{int(top.min()) + k}, {int(top.max()) + k}]")
        if bottom.numel() and (int(bottom.min()) < 0 or int(bottom.max()) >= k):
            raise VQGenError(f"bottom codes must lie in [0, {k}), got [{int(bottom.min())}, {int(bottom.max())}]")
        return (rearrange(top, "n (a b) -> n a b", b=w // 2), rearrange(bottom, "n (h w) -> n h w", w=w))

    def encode(self, x: Tensor) -> Tensor:
        """(b, c, H, W) -> (b, h + top_rows, w) stacked codes."""
        top, bottom = self.levels(x)
        return self.stack(top.indices, bottom.indices)

    def decode(self, grids: Tensor) -> Tensor:
        """(b, h + top_rows, w) stacked codes -> (b, c, H, W) in [-1, 1] (not clamped)."""
        top, bottom = self.unstack(grids)
        return self.decode_vectors(self.top_quantizer.decode_indices(top), self.quantizer.decode_indices(bottom))


def load_two_level(out: Path) -> TwoLevelVQVAE:
    stage = ModelDir(out / STAGE)
    info = json.loads((out / "two_level.json").read_text())
    model = TwoLevelVQVAE(load_config(VQVAEConfig, stage.config), info["top_codes"])
    load_weights(model, stage.weights)
    return model.eval()


def train(run_dir: Path, out: Path, top_codes: int, max_steps: int | None = None) -> dict:
    """The two-level VQ-VAE on RUN's data with RUN's stage-1 settings, then its stacked codes (module docstring)."""
    base = RunLayout(run_dir).vqvae
    if not base.trained:
        raise VQGenError(f"{base.path} has no trained VQ-VAE to take the settings and data from")
    if top_codes < 2:
        raise VQGenError(f"--top-codes must be >= 2, got {top_codes}")
    stage = ModelDir(out / STAGE)
    if stage.path.exists() or RunLayout(out).codes.exists():
        raise VQGenError(f"{out} already holds a two-level stage 1 or codes: choose another --out "
                         "(nothing was written)")
    cfg = load_config(VQVAEConfig, base.config)
    data_cfg = load_config(DataConfig, base.data_config)
    if data_cfg.code_copies:
        raise VQGenError(f"RUN's codes hold {data_cfg.code_copies} augmented copies per image; this benchmark "
                         "encodes each image once (train RUN without --code-copies)")
    check_two_level(cfg)
    # the HTML report reads a run's own stage folders, which OUT has not
    train_cfg = dataclasses.replace(load_config(TrainConfig, base.train_config), report=False,
                                    **({"max_steps": max_steps} if max_steps else {}))
    images = load_image_data(data_cfg)
    accelerator, console = start(stage, train_cfg)
    stage.path.mkdir(parents=True)
    save_config(cfg, stage.config)
    model = TwoLevelVQVAE(cfg, top_codes).to(memory_format=torch.channels_last)
    loader = make_loader(ImageDataset(images.train), train_cfg.batch_size, train=True, seed=train_cfg.seed,
                         num_workers=train_cfg.num_workers)
    test_loader = accelerator.prepare(make_loader(ImageDataset(images.test), train_cfg.batch_size,
                                                  num_workers=train_cfg.num_workers))
    preview = to_model_range(images.test.take(range(min(16, len(images.test)))))
    task = VQVAETask(accelerator, cfg, test_loader, stage, preview, name="two-level vqvae")
    metrics = fit(accelerator, train_cfg, task, model, make_optimizer(model, train_cfg), loader, stage,
                  console=console)
    model = accelerator.unwrap_model(model).eval()
    used = write_codes(model, run_dir, out, images, train_cfg.batch_size)
    info = {"run": str(run_dir), "top_codes": top_codes, "bottom_codes": cfg.codebook_size,
            "grid": list(cfg.grid_shape), "top_rows": model.top_rows, "codes_used": used,
            "best": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    (out / "two_level.json").write_text(json.dumps(info, indent=1))
    return info


@torch.no_grad()
def write_codes(model: TwoLevelVQVAE, run_dir: Path, out: Path, images, batch_size: int) -> dict:
    """OUT/codes: every split's stacked grids, with RUN's labels and metadata (taller grids, K + top codes)."""
    splits, meta = load_codes(RunLayout(run_dir).codes)
    writer = CodesWriter(RunLayout(out).codes)
    used = {}
    for name, split in (("train", images.train), ("test", images.test)):
        if len(split) != len(splits[name].codes):
            raise VQGenError(f"RUN's {name} codes hold {len(splits[name].codes)} grids for {len(split)} images: "
                             "re-run `vqgen encode` on RUN")
        grids = torch.cat([model.encode(to_model_range(split.take(range(i, min(i + batch_size, len(split))))))
                           for i in range(0, len(split), batch_size)])
        top, bottom = model.unstack(grids)
        used[name] = {"top": int(top.unique().numel()), "bottom": int(bottom.unique().numel())}
        writer.add(name, grids)
    h, w = model.config.grid_shape
    writer.finish(dataclasses.replace(meta, codebook_size=model.config.codebook_size + model.top_codebook_size,
                                      grid_height=h + model.top_rows,
                                      vqvae_fingerprint=weights_fingerprint(out / STAGE),
                                      vqvae_dir=str((out / STAGE).resolve())),
                  {name: split.labels for name, split in splits.items()},
                  {name: split.conditions for name, split in splits.items()})
    return used


def score(run_dir: Path, out: Path, samples: int, seeds: list[int], cfg_scale: float, batch_size: int) -> dict:
    """Samples of OUT's prior and the two-level reconstructions, scored with RUN's judge."""
    model = load_two_level(out)
    info = json.loads((out / "two_level.json").read_text())

    @torch.no_grad()
    def decode(grids: Tensor) -> Tensor:
        return torch.cat([to_uint8(model.decode(g)) for g in grids.split(batch_size)])

    @torch.no_grad()
    def reconstruct(images: Tensor) -> Tensor:
        return torch.cat([to_uint8(reconstruction_errors(model, to_model_range(b))[1])
                          for b in images.split(batch_size)])

    @torch.no_grad()
    def encode(images: Tensor) -> Tensor:
        return torch.cat([model.encode(to_model_range(b)) for b in images.split(batch_size)])

    results = score_stacked(run_dir, out, info["top_rows"] * info["grid"][1], info["bottom_codes"], decode,
                            samples, seeds, cfg_scale, batch_size, reconstruct=reconstruct, encode=encode)
    results["settings"].update(info)
    (out / "hierarchical.json").write_text(json.dumps(results, indent=1))
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["train", "score"])
    p.add_argument("--run", type=Path, required=True, help="the stage-1 run (its settings, data, labels and judge)")
    p.add_argument("--out", type=Path, required=True, help="the run folder of the two-level stage 1 and its prior")
    p.add_argument("--top-codes", type=int, default=512, help="codes of the top level's codebook (default: 512)")
    p.add_argument("--max-steps", type=int, default=None, help="train: steps (default: RUN's)")
    add_score_options(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> None:
        if args.what == "train":
            print(json.dumps(train(args.run, args.out, args.top_codes, args.max_steps)))
        else:
            result = score(args.run, args.out, args.samples, args.seeds, args.cfg, args.batch_size)
            print(json.dumps({k: v for k, v in result.items() if k != "seeds"}))

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
