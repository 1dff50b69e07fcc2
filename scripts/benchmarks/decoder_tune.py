"""Does a decoder trained on the prior's own slips draw better samples? (experiment; not a vqgen option)

    python scripts/benchmarks/decoder_tune.py --run RUN --out OUT [--steps 600] [--lr 2e-4] [--cfg 1.5]
    vqgen eval --run OUT --samples 1000 --seeds 2 --cfg 1.5 --cfg-schedule constant --allow-vqvae-mismatch

Copies RUN (stage 1 and prior) to OUT, then trains OUT's decoder alone: each step takes a batch of training
images and their codes, draws every code again from the prior's teacher-forced prediction (each place given
the true codes before it, guided at --cfg, temperature 1, all places at once), and asks the decoder to
reconstruct the image from those codes, beside the plain reconstruction from the true codes (the two MSEs
summed). The encoder, the codebook and the prior stay as they were, so OUT's prior draws the very same codes
for the same seeds as RUN's: `vqgen eval` on both compares two decoders on the same samples.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stage1_vqvae.config import VQVAEConfig
from stage1_vqvae.model import VQVAE
from stage2_prior.registry import load_prior
from stage2_prior.sampling import guide
from vqgen.core.data.config import DataConfig
from vqgen.core.data.images import load_image_data, to_model_range
from vqgen.core.store.codes import load_codes
from vqgen.core.store.configs import load_config
from vqgen.core.store.layout import RunLayout
from vqgen.core.store.weights import load_model, save_model


def prior_draws(prior: torch.nn.Module, codes: torch.Tensor, labels: torch.Tensor | None,
                cfg: float) -> torch.Tensor:
    """(b, h, w) true codes -> (b, h, w) codes drawn at every place from the prior given the true codes before
    it, guided at `cfg` (conditional rows against null-class rows)."""
    with torch.no_grad():
        if labels is not None and cfg != 1.0:
            null = torch.full_like(labels, prior.config.num_classes)
            logits = guide(prior(torch.cat([codes, codes]), torch.cat([labels, null])), cfg)  # halves on dim 0
        else:
            logits = prior(codes, labels).float()
        return torch.distributions.Categorical(logits=logits).sample()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--clean-weight", type=float, default=1.0, help="weight of the plain reconstruction's MSE")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    src, out = RunLayout(args.run), RunLayout(args.out)
    if args.out.exists():
        raise SystemExit(f"{args.out} exists")
    shutil.copytree(args.run, args.out, ignore=shutil.ignore_patterns("state", "outputs", "samples*"))
    torch.manual_seed(args.seed)
    vqvae = load_model(VQVAE, VQVAEConfig, src.vqvae.path)
    prior, _ = load_prior(src.prior)
    data = load_image_data(load_config(DataConfig, src.vqvae.data_config))
    splits, _ = load_codes(src.codes)
    images, codes, labels = data.train.images, splits["train"].codes, splits["train"].labels
    n = images.shape[0]
    vqvae.eval()
    with torch.no_grad():  # the dump holds the images' codes in order
        if not torch.equal(vqvae.encode(to_model_range(images[:64])), codes[:64].long()):
            raise SystemExit(f"{src.codes} does not hold the codes of the run's training images in order")
    decoder = vqvae.decoder.train()
    opt = torch.optim.AdamW(decoder.parameters(), lr=args.lr, weight_decay=0.0)
    start, log = time.time(), []
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, n, (args.batch_size,))
        x = to_model_range(images[idx])
        c = codes[idx].long()
        y = labels[idx] if labels is not None else None
        drawn = prior_draws(prior, c, y, args.cfg)
        with torch.no_grad():
            z_true, z_drawn = vqvae.quantizer.decode_indices(c), vqvae.quantizer.decode_indices(drawn)
        slip_mse = F.mse_loss(decoder(z_drawn), x)
        clean_mse = F.mse_loss(decoder(z_true), x)
        loss = slip_mse + args.clean_weight * clean_mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == 1:
            rec = dict(step=step, slip_mse=slip_mse.item(), clean_mse=clean_mse.item(),
                       changed=(drawn != c).float().mean().item(), seconds=round(time.time() - start, 1))
            log.append(rec)
            print(json.dumps(rec), flush=True)
    vqvae.eval()
    save_model(vqvae, vqvae.config, out.vqvae.path)
    (args.out / "decoder_tune.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                            "log": log}, indent=1))
    print(f"saved {out.vqvae.path} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
