"""Speed and memory of the GPU path (or the CPU): stage-1 training, prior training, sampling.

    python scripts/benchmarks/speed.py                         # everything, on CUDA when present
    python scripts/benchmarks/speed.py --mixed-precision bf16 --compile
    python scripts/benchmarks/speed.py --only stage1 --sizes 32 64 --steps 5     # a quick CPU look
    python scripts/benchmarks/speed.py --only stage1 --sizes 256 --adversarial --mixed-precision bf16
    python scripts/benchmarks/speed.py --only sampling --priors transformer masked --fill-steps 4 8 12 16 32
    python scripts/benchmarks/speed.py --trunk vqgan --sizes 256 --grids 16 32 --only stage1 prior sampling \
        --mixed-precision bf16 --compile        # a VQGAN-class tokenizer and the priors' MFU, on a GPU

Stage 1: optimizer steps per second of the VQ-VAE at each image size (the paper's convnet at 32 px,
the scalable trunk of the size's preset above), reported as images/s, on random batches that already
sit on the device (model throughput; data loading is measured by scripts/benchmarks/pipeline.py); with
--adversarial, the step of docs/adversarial.md (discriminator, LeCam, adaptive weight, MS-SSIM) and the
discriminator's own. Stage 2: codes/s of a training step of each prior (its own objective: the masked
prior's on a masked share of each grid) at 8x8, 16x16 and 32x32 grids. Sampling: seconds to draw N code
grids with the KV cache (transformer), the row cache (PixelCNN) or in --fill-steps parallel steps
(masked), then to decode them. Attention: the cached
step's one-query attention over a key length growing by one per step (N grids at --cfg-scale: 2N rows,
4 heads of 32), through scaled_dot_product_attention with PyTorch's default backends, the same once
their per-shape plans exist, with cuDNN's excluded, as two matmuls and a softmax, and as vqgen's step:
ms per step over one pass of 256 lengths. Training figures time --steps steps run back to back after
--warmup untimed ones, synchronised once at each end (as a training loop runs); peak memory is the
CUDA allocator's peak (or the process's peak RSS on the CPU). Results are printed as a table and
written to --out as JSON. Training rows also give the FLOPs of one forward and backward pass
(torch.utils.flop_counter: matmuls and convolutions), the achieved TFLOP/s, and on a card of known peak
(or --peak-tflops) the model FLOPs utilisation, achieved over the dense peak.

As the trainers run: TF32 on, cuDNN's per-shape autotuning (torch.backends.cudnn.benchmark) off. On an
H100 autotuning made the 256 px step slower, 271 against 291 img/s (README, "GPU path"), so the trainers
leave it off; --cudnn-benchmark measures it. The stage-1 batch is by size (128/64/32/16 at 32/64/128/256
px) unless --stage1-batch sets one; the trainer's default is 32 at every size.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from stage1_vqvae.config import PRESETS, GANConfig, VQVAEConfig
from stage1_vqvae.gan_loss import GANLoss
from stage1_vqvae.model import VQVAE
from stage2_prior.parallel import DEFAULT_STEPS, fill_masked
from stage2_prior.registry import PRIORS
from stage2_prior.sampling import sample_codes
from stage2_prior.transformer import one_query_attention
from vqgen.core.training.loop import compile_model

STAGE1_BATCH = {32: 128, 64: 64, 128: 32, 256: 16}
GRIDS = (8, 16, 32)
# --trunk vqgan: the tokenizer of VQGAN's f=16 models (Esser et al. 2021), in this project's trunk: width
# 128, two residual blocks per level, self-attention at the lowest resolution, one level per halving.
VQGAN_TRUNK = dict(architecture="resnet", hidden_channels=128, num_res_blocks=2, attention=True)
# --adversarial: stage 1 as docs/adversarial.md trains it with both terms on, from the first step: the patch
# discriminator with its default augmentation and LeCam, VQGAN's adaptive weight, and the MS-SSIM term
ADVERSARIAL = GANConfig(adversarial_weight=0.1, lecam_weight=0.001, perceptual_weight=0.1)
# Dense bf16/fp16 tensor-core peaks in TFLOP/s (the vendors' figures without sparsity), by a substring of
# torch.cuda.get_device_name; --peak-tflops gives any other card's.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10": 125.0}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}  # --mixed-precision -> autocast dtype


def autocast(device: torch.device, precision: str):
    if precision == "no":
        return nullcontext()
    return torch.autocast(device.type, dtype=HALF[precision])


def timed(step, warmup: int, repeats: int, device: torch.device) -> float:
    """Seconds per call of `step()`: `repeats` calls back to back after `warmup` untimed ones, with one
    synchronisation at each end, as a training loop runs them (the host queues the next step's kernels
    while the card runs the current one; a sync after every step would time launch gaps as well)."""
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    sync(device)
    return (time.perf_counter() - start) / repeats


def stage1_config(size: int, trunk: str = "preset", channels: int = 3) -> VQVAEConfig:
    """trunk "preset": the model of `--preset SIZE` (`stage1_vqvae.train.PRESETS`): the paper's convnet at
    32 px, the scalable trunk above; the paper net at the sized width for colour images (128). trunk "vqgan":
    `VQGAN_TRUNK` at downsample 16 (8 below 128 px), widths 1,1,2,2,4 as in VQGAN (fewer levels: the
    preset's multipliers' pattern)."""
    if trunk == "vqgan":
        downsample = 16 if size >= 128 else 8
        levels = downsample.bit_length()
        options = {**VQGAN_TRUNK, "downsample": downsample, "channel_mult": (1, 1, 2, 2, 4)[-levels:]}
    else:
        options = {"hidden_channels": 128, "res_channels": 64, **PRESETS[str(size)]}
    return VQVAEConfig(in_channels=channels, image_height=size, image_width=size, **options)


def peak_tflops(args, device: torch.device) -> float | None:
    """The card's dense half-precision peak: --peak-tflops, else by its name; None on the CPU or unknown."""
    if args.peak_tflops:
        return args.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def step_flops(forward_backward) -> float:
    """FLOPs of one forward and backward pass, counted by torch.utils.flop_counter (matmuls and
    convolutions: the work MFU is measured against; the optimizer's elementwise update is not counted).
    Attention is counted through its math path, as two matmuls over the whole key length: the counter
    knows no fused CPU kernel, so the same model counts the same on every device."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        forward_backward()
    return float(counter.get_total_flops())


def utilisation(flops: float, seconds: float, args, device: torch.device) -> dict:
    """Achieved TFLOP/s and, where the card's peak is known, model FLOPs utilisation."""
    achieved = flops / seconds / 1e12
    peak = peak_tflops(args, device)
    return {"tflop_per_step": round(flops / 1e12, 4), "achieved_tflops": round(achieved, 2),
            "mfu": round(achieved / peak, 3) if peak else None}


def adversarial_terms(cfg: VQVAEConfig, args, device: torch.device) -> GANLoss:
    """`ADVERSARIAL`'s discriminator and terms for `cfg`'s autoencoder, on `device`, adversarial from step 0."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=args.mixed_precision)
    gan = GANLoss(ADVERSARIAL, cfg, accelerator, learning_rate=1e-4)
    gan.critic.to(device, memory_format=torch.channels_last)  # in place: the optimizer holds the same tensors
    return gan


def bench_stage1(size: int, batch: int, args, device: torch.device) -> dict:
    """One optimizer step of the autoencoder, and with --adversarial also its discriminator's, as the trainer
    takes them (the adversarial and perceptual terms inside the autoencoder's loss, then the discriminator on
    the same batch's detached reconstructions)."""
    cfg = stage1_config(size, args.trunk)
    model = VQVAE(cfg).to(device, memory_format=torch.channels_last)
    images = (torch.rand(batch, 3, size, size, device=device) * 2 - 1).contiguous(memory_format=torch.channels_last)
    gan = adversarial_terms(cfg, args, device) if args.adversarial else None
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")

    def forward_backward():
        with autocast(device, args.mixed_precision):
            out = model(images)
        loss = out.loss
        if gan is not None:
            loss = loss + gan.generator_terms(model, images, out)[0]
        scaler.scale(loss).backward()
        if gan is not None:
            d_loss, _ = gan.discriminator_loss(gan.critic)
            scaler.scale(d_loss).backward()

    flops = step_flops(forward_backward)  # before compiling: the counter needs eager ops
    model.zero_grad(set_to_none=True)
    if args.compile:
        compile_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    optimizers = [optimizer] + ([gan.optimizer] if gan is not None else [])
    reset_peak(device)

    def step():
        forward_backward()
        for opt in optimizers:
            scaler.step(opt)
        scaler.update()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)

    seconds = timed(step, args.warmup, args.steps, device)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    if gan is not None:
        params += sum(p.numel() for p in gan.critic.parameters()) / 1e6
    return {"size": size, "trunk": args.trunk, "terms": "mse+adv+ms_ssim" if gan is not None else "mse",
            "architecture": cfg.architecture,
            "grid": f"{cfg.grid_shape[0]}x{cfg.grid_shape[1]}", "batch": batch, "params_m": round(params, 2),
            "img_per_s": round(batch / seconds, 1), "peak_gib": round(peak_gib(device), 2),
            **utilisation(flops, seconds, args, device)}


def make_prior(kind: str, grid: int, codebook_size: int, device: torch.device):
    config_cls, model_cls = PRIORS[kind].config, PRIORS[kind].model
    cfg = config_cls(codebook_size=codebook_size, grid_height=grid, grid_width=grid, num_classes=10)
    return model_cls(cfg).to(device)


def bench_prior_training(kind: str, grid: int, args, device: torch.device) -> dict:
    model = make_prior(kind, grid, args.codebook_size, device)
    batch = args.prior_batch
    codes = torch.randint(args.codebook_size, (batch, grid, grid), device=device)
    labels = torch.randint(10, (batch,), device=device)
    loss_of = PRIORS[kind].loss  # (model, codes, labels) -> (loss, logs): the kind's training objective
    flops = step_flops(lambda: loss_of(model, codes, labels)[0].backward())
    model.zero_grad(set_to_none=True)
    if args.compile:
        compile_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    reset_peak(device)

    def step():
        with autocast(device, args.mixed_precision):
            loss, _ = loss_of(model, codes, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(step, args.warmup, args.steps, device)
    return {"prior": kind, "grid": f"{grid}x{grid}", "batch": batch,
            "codes_per_s": round(batch * grid * grid / seconds), "peak_gib": round(peak_gib(device), 2),
            **utilisation(flops, seconds, args, device)}


def bench_sampling(kind: str, grid: int, args, device: torch.device) -> list[dict]:
    """A raster prior once (a step per code); the masked prior once per --fill-steps."""
    if PRIORS[kind].raster:
        return [bench_sampling_with(kind, grid, None, args, device)]
    return [bench_sampling_with(kind, grid, steps, args, device) for steps in args.fill_steps]


def bench_sampling_with(kind: str, grid: int, fill_steps: int | None, args, device: torch.device) -> dict:
    prior = make_prior(kind, grid, args.codebook_size, device).eval()
    steps = grid * grid if fill_steps is None else min(fill_steps, grid * grid)  # a raster prior: one per code
    if fill_steps is None:
        draw = partial(sample_codes, prior, cfg_scale=args.cfg_scale)
    else:
        draw = partial(fill_masked, prior, steps=steps, cfg_scale=args.cfg_scale)
    decoder_cfg = VQVAEConfig(image_height=4 * grid, image_width=4 * grid, codebook_size=args.codebook_size)
    decoder = VQVAE(decoder_cfg).to(device)
    decoder.eval()
    n = args.samples
    labels = torch.arange(n) % 10
    reset_peak(device)
    with autocast(device, args.mixed_precision):
        draw(min(n, 8), labels=labels[:8])  # warm-up
        sync(device)
        start = time.perf_counter()
        codes = draw(n, labels=labels, batch_size=args.sample_batch)
        sync(device)
        codes_s = time.perf_counter() - start

        def decode():
            with torch.inference_mode():
                for chunk in codes.split(256):
                    decoder.decode(chunk)

        decode()  # untimed: the first call of each chunk shape holds cuDNN's set-up (and autotuning, if on)
        sync(device)
        start = time.perf_counter()
        decode()
        sync(device)
        decode_s = time.perf_counter() - start
    return {"prior": kind, "grid": f"{grid}x{grid}", "steps": steps, "n": n, "cfg_scale": args.cfg_scale,
            "codes_s": round(codes_s, 2), "decode_s": round(decode_s, 2),
            "ms_per_image": round(1000 * (codes_s + decode_s) / n, 2), "peak_gib": round(peak_gib(device), 2)}


def bench_step_attention(args, device: torch.device, steps: int = 256) -> list[dict]:
    rows, heads, head_dim = 2 * args.samples if args.cfg_scale != 1 else args.samples, 4, 32
    dtype = HALF.get(args.mixed_precision, torch.float32)
    q = torch.randn(rows, heads, 1, head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(rows, heads, steps, head_dim, device=device, dtype=dtype) for _ in range(2))
    ways = [("sdpa, default backends, first pass", F.scaled_dot_product_attention),
            ("sdpa, default backends, shapes seen", F.scaled_dot_product_attention),
            ("sdpa without cuDNN", partial(one_query_attention, fused=True)),
            ("matmul + softmax", partial(one_query_attention, fused=False)),
            ("vqgen's step", one_query_attention)]  # the one of the two above that this device takes
    out = []
    for name, attend in ways:
        sync(device)
        start = time.perf_counter()
        for length in range(1, steps + 1):
            attend(q, k[:, :, :length], v[:, :, :length])
        sync(device)
        seconds = time.perf_counter() - start
        out.append({"attention": name, "rows": rows, "steps": steps, "ms_per_step": round(1000 * seconds / steps, 3)})
    return out


def table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("stage1", "prior", "sampling", "attention"), nargs="*", default=None,
                   help="parts to run (default: all)")
    p.add_argument("--sizes", type=int, nargs="*", default=[32, 64, 128, 256], help="stage-1 image sizes")
    p.add_argument("--trunk", choices=("preset", "vqgan"), default="preset",
                   help="stage-1 model: each size's preset, or a VQGAN-class trunk (width 128, two residual "
                        "blocks per level, attention at the lowest resolution, downsample 16 from 128 px)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the card's dense peak in TFLOP/s at the measured precision, for MFU (default: "
                        "known cards' bf16 peak by name; none on the CPU)")
    p.add_argument("--grids", type=int, nargs="*", default=list(GRIDS), help="prior grid sides")
    p.add_argument("--priors", nargs="*", default=["transformer", "pixelcnn"], help="priors to measure")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument("--adversarial", action="store_true",
                   help="stage 1 with the patch discriminator, LeCam, the adaptive weight and MS-SSIM "
                        "(docs/adversarial.md), both optimizer steps timed")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (training parts)")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=False,
                   help="let cuDNN time its convolution algorithms per shape (torch.backends.cudnn.benchmark; "
                        "default: off, as the trainers run)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--stage1-batch", type=int, default=None,
                   help="batch for every size (default: 128/64/32/16 by size; the trainer's default is 32)")
    p.add_argument("--prior-batch", type=int, default=32)
    p.add_argument("--codebook-size", type=int, default=512)
    p.add_argument("--samples", type=int, default=1000, help="code grids to sample")
    p.add_argument("--sample-batch", type=int, default=None, help="grids sampled at once (default: all)")
    p.add_argument("--fill-steps", type=int, nargs="+", default=[DEFAULT_STEPS],
                   help="decoding steps of the masked prior, each measured (default: vqgen sample's)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="guidance scale while sampling (the default)")
    p.add_argument("--cpu", action="store_true", help="measure on the CPU even when CUDA is present")
    p.add_argument("--out", type=Path, default=Path("benchmark_speed.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parts = args.only or ["stage1", "prior", "sampling", "attention"]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    info = {"device": device_name(device), "torch": torch.__version__, "mixed_precision": args.mixed_precision,
            "compile": args.compile, "cudnn_benchmark": args.cudnn_benchmark}
    print(json.dumps(info))
    results: dict = {"info": info, "stage1": [], "prior": [], "sampling": [], "attention": []}

    def record(part: str, row: dict) -> None:
        results[part].append(row)
        print(json.dumps(row), flush=True)
        args.out.write_text(json.dumps(results, indent=1))

    if "stage1" in parts:
        for size in args.sizes:
            record("stage1", bench_stage1(size, args.stage1_batch or STAGE1_BATCH.get(size, 16), args, device))
    if "prior" in parts:
        for kind in args.priors:
            for grid in args.grids:
                record("prior", bench_prior_training(kind, grid, args, device))
    if "sampling" in parts:
        for kind in args.priors:
            for grid in args.grids:
                for row in bench_sampling(kind, grid, args, device):
                    record("sampling", row)
    if "attention" in parts:
        for row in bench_step_attention(args, device):
            record("attention", row)
    print(f"\n{info['device']}, torch {info['torch']}, mixed precision {args.mixed_precision}, "
          f"compile {args.compile}")
    for part in ("stage1", "prior", "sampling", "attention"):
        if results[part]:
            print(f"\n{part}\n{table(results[part])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
