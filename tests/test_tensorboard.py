"""`--report-to tensorboard` and `--report-to wandb` (offline): what training and `vqgen sample` log, read back."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from conftest import TINY_DATA, TINY_TRANSFORMER, TINY_VQVAE, tiny_train
from stage1_vqvae.train import train_vqvae
from stage2_prior.train import train_prior
from vqgen.cli import main
from vqgen.core.store.layout import RunLayout


def _train_both(run: Path, tracker: str) -> None:
    """Stage 1 evaluated at steps 3 and 6, the prior at 2 and 4, both logging to `tracker`; then 4 samples."""
    train_vqvae(run, TINY_DATA, tiny_train(max_steps=6, eval_every=3, report_to=tracker, report=False), TINY_VQVAE)
    train_prior(run, "transformer", tiny_train(max_steps=4, eval_every=2, report_to=tracker, report=False),
                TINY_TRANSFORMER)
    assert main(["sample", "--run", str(run), "--n", "4", "--nrow", "2"]) == 0


def test_tensorboard_gets_scalars_reconstructions_and_samples(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = RunLayout(tmp_path / "run")
    _train_both(run.root, "tensorboard")

    def events(stage: str) -> EventAccumulator:
        return EventAccumulator(str(getattr(run, stage).logs / f"vqgen-{stage}"), size_guidance={"images": 0}).Reload()

    vqvae, prior = events("vqvae"), events("prior")
    scalars = vqvae.Tags()["scalars"]
    assert {"train/loss", "train/recon_mse", "train/usage", "train/lr", "test/mse", "test/psnr", "test/perplexity",
            "test/best_step"} <= set(scalars)
    assert [e.step for e in vqvae.Scalars("test/mse")] == [3, 6]
    assert [e.step for e in vqvae.Scalars("train/loss")] == list(range(1, 7))
    shots = vqvae.Images("test/reconstructions")
    assert [e.step for e in shots] == [3, 6]
    assert (shots[0].width, shots[0].height) == (2 + 16 * 34, 2 + 2 * 34)  # 16 originals over 16 reconstructions
    assert shots[0].encoded_image_string.startswith(b"\x89PNG")
    assert {"train/bits_per_code", "test/bits_per_code", "test/bits_per_image"} <= set(prior.Tags()["scalars"])
    best = prior.Scalars("test/best_step")[-1].value
    samples = prior.Images("samples/grid")  # from `vqgen sample`, at the step of the prior in use
    assert [(e.step, e.width, e.height) for e in samples] == [(best, 2 + 2 * 34, 2 + 2 * 34)]


def wandb_history(run_file: Path) -> list[dict[str, str]]:
    """The history records of an offline W&B run file: a LevelDB-style log (32 KiB blocks of chunks, each with
    a 7-byte header: crc32, length, type) of protobuf `Record`s, after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    data, pos, parts, rows = run_file.read_bytes(), 7, [], []
    assert data[:4] == b":W&B", data[:8]
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return rows


def test_wandb_offline_gets_scalars_reconstructions_and_samples(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):  # not in ~
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    run = RunLayout(tmp_path / "run")
    _train_both(run.root, "wandb")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "wandb-home"]

    def history(stage: str) -> list[dict[str, str]]:
        """Every W&B run's history in the stage's logs: the training's and (prior) `vqgen sample`'s."""
        files = (getattr(run, stage).logs / "wandb").glob("offline-run-*/run-*.wandb")
        return [row for f in files for row in wandb_history(f)]

    vqvae = history("vqvae")
    keys = set().union(*vqvae)
    assert {"train/loss", "train/usage", "test/mse", "test/psnr", "test/best_step"} <= keys
    assert [int(r["_step"]) for r in vqvae if "test/mse" in r] == [3, 6]
    shots = [r for r in vqvae if "test/reconstructions/_type" in r]
    assert [int(r["_step"]) for r in shots] == [3, 6]
    media = sorted((run.vqvae.logs / "wandb").glob("offline-run-*/files/media/images/test/reconstructions_*.png"))
    assert len(media) == 2
    prior = history("prior")
    assert {"train/bits_per_code", "test/bits_per_code"} <= set().union(*prior)
    best = [int(r["test/best_step"]) for r in prior if "test/best_step" in r][-1]
    samples = [r for r in prior if "samples/grid/_type" in r]  # `vqgen sample`'s run, in the prior's project
    for _ in range(40):  # W&B's own process may still be writing the run file that `finish` closed
        if samples:
            break
        time.sleep(0.5)
        samples = [r for r in history("prior") if "samples/grid/_type" in r]
    assert [(r["samples/grid/_type"], int(r["_step"])) for r in samples] == [('"image-file"', best)]
