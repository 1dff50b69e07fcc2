"""Stage 1 end to end on tiny settings: training lowers the loss, writes every file, resumes exactly."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_DATA, tiny_train
from conftest import TINY_VQVAE as TINY_MODEL
from stage1_vqvae.train import train_vqvae
from vqgen.core.data.images import DataConfig
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store.codes import load_codes
from vqgen.core.training.config import TrainConfig
from vqgen.core.training.loop import learning_rate_at

ROOT = Path(__file__).resolve().parents[1]
def records(path: Path, split: str):
    return [json.loads(line) for line in path.read_text().splitlines() if json.loads(line)["split"] == split]


def test_training_lowers_the_loss_and_writes_every_file(tmp_path):
    run = tmp_path / "run"
    metrics = train_vqvae(run, TINY_DATA, tiny_train(max_steps=30, eval_every=15, save_every=10, keep=2),
                          TINY_MODEL)
    vq = run / "vqvae"
    for name in ("config.json", "model.safetensors", "train_config.json", "data_config.json", "metrics.jsonl"):
        assert (vq / name).is_file(), name
    states = sorted(p.name for p in (vq / "state").iterdir())
    assert states == ["step-00000020", "step-00000030"], states  # keep=2, no temporary leftovers
    assert len(list((vq / "reconstructions").glob("*.png"))) == 2
    train = records(vq / "metrics.jsonl", "train")
    assert train[-1]["loss"] < train[0]["loss"]
    assert {"usage", "perplexity", "dead_codes", "recon_mse", "commitment", "samples_per_s"} <= set(train[-1])
    test = records(vq / "metrics.jsonl", "test")
    assert [r["step"] for r in test] == [15, 30]
    assert metrics["mse"] == test[-1]["mse"] and metrics["psnr"] > 0
    splits, meta = load_codes(run / "codes")
    assert (meta.codebook_size, meta.grid_height, meta.grid_width) == (16, 8, 8)
    assert meta.num_classes == 6 and len(meta.class_names) == 6
    assert splits["train"].codes.shape == (96, 8, 8) and splits["test"].codes.shape == (40, 8, 8)
    assert splits["train"].labels.shape == (96,)


def test_codes_match_the_saved_model(tmp_path):
    from stage1_vqvae.config import VQVAEConfig
    from stage1_vqvae.model import VQVAE
    from vqgen.core.data.images import load_image_data, to_model_range
    from vqgen.core.store.weights import load_model

    run = tmp_path / "run"
    train_vqvae(run, TINY_DATA, tiny_train(max_steps=3), TINY_MODEL)
    model = load_model(VQVAE, VQVAEConfig, run / "vqvae").eval()
    data = load_image_data(TINY_DATA)
    with torch.no_grad():
        expected = model.encode(to_model_range(data.test.images))
    splits, _ = load_codes(run / "codes")
    assert torch.equal(splits["test"].codes, expected)
    assert torch.equal(splits["test"].labels, data.test.labels)


def test_resume_continues_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_vqvae(straight, TINY_DATA, tiny_train(max_steps=8, save_every=4), TINY_MODEL, encode=False)
    train_vqvae(split, TINY_DATA, tiny_train(max_steps=4, save_every=4), TINY_MODEL, encode=False)
    train_vqvae(split, TINY_DATA, tiny_train(max_steps=8, save_every=4), resume=True, encode=False)
    a = load_file(straight / "vqvae" / "model.safetensors")
    b = load_file(split / "vqvae" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    losses = lambda run: [(r["step"], r["loss"]) for r in records(run / "vqvae" / "metrics.jsonl", "train")]
    assert losses(split)[4:] == losses(straight)[4:]  # steps 5..8: same losses to the last bit
    opt_a = torch.load(straight / "vqvae/state/step-00000008/optimizer.bin", weights_only=True)
    opt_b = torch.load(split / "vqvae/state/step-00000008/optimizer.bin", weights_only=True)
    for key, value in opt_a["state"].items():
        assert torch.equal(value["exp_avg"], opt_b["state"][key]["exp_avg"])
        assert int(value["step"]) == int(opt_b["state"][key]["step"]) == 8


def test_resume_refuses_a_different_config_and_a_missing_state(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(VQGenError, match="no saved training state"):
        train_vqvae(run, TINY_DATA, tiny_train(max_steps=2), TINY_MODEL, resume=True)
    train_vqvae(run, TINY_DATA, tiny_train(max_steps=2), TINY_MODEL, encode=False)
    with pytest.raises(VQGenError, match="codebook_size=32 \\(run has 16\\)"):
        train_vqvae(run, TINY_DATA, tiny_train(max_steps=4), {**TINY_MODEL, "codebook_size": 32}, resume=True)


def test_learning_rate_schedule():
    cfg = TrainConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate_at(cfg, 0, 100) == pytest.approx(0.1)
    assert learning_rate_at(cfg, 10, 100) == pytest.approx(1.0)
    assert learning_rate_at(cfg, 100, 100) == pytest.approx(0.1)


@pytest.mark.slow
def test_two_process_training_and_encoding(spawn, tmp_path):
    """accelerate launch with 2 CPU processes: identical codebooks, codes neither dropped nor duplicated."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--",
           str(ROOT / "scripts" / "train_vqvae.py"), "--run", str(run), "--builtin-train-size", "96",
           "--builtin-test-size", "41", "--batch-size", "8", "--max-steps", "6", "--hidden-channels", "16",
           "--res-channels", "8", "--codebook-size", "16", "--code-dim", "8", "--restart-after", "2",
           "--eval-every", "3", "--save-every", "3", "--log-every", "1"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}  # Accelerate's multi-CPU mode: gloo
    proc = spawn.run(cmd, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    splits, meta = load_codes(run / "codes")
    assert splits["test"].codes.shape[0] == 41  # 41 is odd: padding must not leak in
    from stage1_vqvae.config import VQVAEConfig
    from stage1_vqvae.model import VQVAE
    from vqgen.core.data.images import load_image_data, to_model_range
    from vqgen.core.store.weights import load_model

    model = load_model(VQVAE, VQVAEConfig, run / "vqvae").eval()
    data = load_image_data(DataConfig(builtin_train_size=96, builtin_test_size=41))
    with torch.no_grad():
        x = to_model_range(data.test.images)
        expected, z = model.encode(x), model.encoder(x)  # z: (n, d, h, w), what the quantizer compares
    # Every code equals the one-process encoding, but for near-ties: two codes equally near z_e to float32's
    # rounding, which a different batch composition may resolve the other way. A dropped, repeated or
    # misplaced image would differ at many places that are no ties.
    got = splits["test"].codes.long()
    codebook = model.quantizer.codebook.detach()
    for n, i, j in (got != expected).nonzero().tolist():
        pair = codebook[[int(got[n, i, j]), int(expected[n, i, j])]]
        near = ((z[n, :, i, j][None] - pair) ** 2).sum(1)
        assert torch.allclose(near[0], near[1], rtol=1e-4), (n, i, j, near.tolist())
    assert (got != expected).float().mean() < 0.01
    # the state holds one RNG file per process; the quantizer buffers are in the (shared) model
    state = sorted((run / "vqvae" / "state").iterdir())[-1]
    assert (state / "random_states_0.pkl").is_file() and (state / "random_states_1.pkl").is_file()


def test_bf16_mixed_precision_training_keeps_the_codebook_fp32(tmp_path):
    run = tmp_path / "run"
    train_vqvae(run, TINY_DATA, tiny_train(max_steps=4, mixed_precision="bf16"), TINY_MODEL)
    weights = load_file(run / "vqvae" / "model.safetensors")
    assert weights["quantizer.codebook"].dtype == torch.float32
    assert all(torch.isfinite(t.float()).all() for t in weights.values())
    assert records(run / "vqvae" / "metrics.jsonl", "test")[-1]["mse"] < 1.0


def test_reconstruct_decodes_once_and_equals_decode_of_encode(tiny_run):
    """`vqgen reconstruct` and `vqgen eval` run the evaluation forward pass once per image, and the
    codes they report decode to exactly that reconstruction."""
    from vqgen.core.data.images import to_model_range, to_uint8
    from vqgen.run import Run

    run = Run.load(tiny_run, need_prior=False)
    images = run.data().test.images[:8]
    calls = []
    hooks = [m.register_forward_hook(lambda *_, name=name: calls.append(name))
             for name, m in (("encoder", run.vqvae.encoder), ("decoder", run.vqvae.decoder))]
    recons, errors, codes = run.reconstruct(images)
    for h in hooks:
        h.remove()
    assert calls == ["encoder", "decoder"]
    with torch.no_grad():
        x = to_model_range(images)
        forward = run.vqvae(x).recon
        assert torch.equal(run.vqvae.encode(x), codes)
        assert torch.equal(run.vqvae.decode(codes), forward)
    assert torch.equal(recons, to_uint8(forward))
    assert torch.allclose(errors, ((forward.clamp(-1, 1) - x) / 2).pow(2).flatten(1).mean(1))


def test_round_trip_counts_the_codes_the_encoder_gives_back(tiny_run):
    """`Run.round_trip`: the share of codes that encoding their images returns, position by position."""
    from vqgen.run import Run

    run = Run.load(tiny_run, need_prior=False)
    images = run.data().test.images[:8]
    codes = run.reconstruct(images)[2]
    assert torch.equal(run.encode(images), codes)  # the encoder alone gives the codes of the reconstruction
    assert run.round_trip(codes, images) == 1.0  # these images encode to exactly these codes
    changed = codes.clone()
    changed[:, ::2] = (changed[:, ::2] + 1) % run.vqvae.config.codebook_size  # every other row of every grid
    expected = (changed == codes).double().mean().item()
    assert expected < 1 and run.round_trip(changed, images) == pytest.approx(expected)
