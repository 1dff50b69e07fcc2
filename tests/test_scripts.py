"""Every bad input the training scripts can get: exit 2, one line naming the value, nothing changed."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import load_script, tree_hashes

ROOT = Path(__file__).resolve().parents[1]


train_vqvae = load_script("train_vqvae")
train_prior = load_script("train_prior")

TINY = ["--hidden-channels", "16", "--res-channels", "8", "--codebook-size", "16", "--code-dim", "8",
        "--max-steps", "2", "--batch-size", "4", "--no-encode"]


@pytest.fixture
def folders(tmp_path, tiny_run):
    """Broken data folders, and a copy of the tiny run whose files must not change."""
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    Image.new("RGB", (32, 32)).save(corrupt / "good.png")
    (corrupt / "broken.png").write_bytes(b"\x89PNG not really")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (32, 32)).save(mixed / "a.png")
    Image.new("RGB", (40, 24)).save(mixed / "b.png")
    odd = tmp_path / "odd"
    odd.mkdir()
    for i in range(4):
        Image.new("RGB", (30, 30), (i * 40, 0, 0)).save(odd / f"{i}.png")
    gray = tmp_path / "gray"
    gray.mkdir()
    for i in range(8):
        Image.new("L", (32, 32), i * 20).save(gray / f"{i}.png")
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    return {"empty": empty, "corrupt": corrupt, "mixed": mixed, "odd": odd, "gray": gray, "run": run,
            "missing": tmp_path / "missing", "tmp": tmp_path}


VQVAE_CASES = [
    (["--data", "{missing}"], "{missing}"),
    (["--data", "{empty}"], "{empty}"),
    (["--data", "{corrupt}"], "broken.png"),
    (["--data", "{mixed}"], "32x32"),
    (["--data", "{odd}"], "not divisible by the downsampling factor 4"),
    # a model option that --image-size already refutes is refused before the data is read: not the corrupt image
    (["--data", "{corrupt}", "--image-size", "30"], "image height 30 is not divisible by the downsampling factor 4"),
    (["--run", "{run}", "--resume", "--data", "{gray}"], "source='{gray}' (run has 'builtin')"),
    (["--run", "{run}", "--resume", "--codebook-size", "32"], "codebook_size=32 (run has 16)"),
    (["--run", "{tmp}/fresh", "--resume"], "no saved training state under {tmp}/fresh/vqvae/state"),
    (["--run", "{run}"], "already holds a trained VQ-VAE: pass --resume to continue it or --overwrite"),
    (["--run", "{run}", "--overwrite", "--data", "{empty}"], "{empty}"),
    (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["--lr", "-1"], "learning_rate must be a positive number, got -1.0"),
    (["--max-steps", "-5"], "max_steps must be >= 0, got -5"),
    (["--codebook-size", "1"], "codebook_size must be in [2, 32768] (codes are stored as int16), got 1"),
    (["--codebook-size", "65536"], "codebook_size must be in [2, 32768] (codes are stored as int16), got 65536"),
    (["--downsample", "3"], "downsample must be a power of two >= 2, got 3"),
    (["--beta", "0"], "beta must be > 0, got 0.0"),
    (["--mixed-precision", "fp8"], "invalid choice: 'fp8'"),
    (["--codebook-update", "kmeans"], "invalid choice: 'kmeans'"),
    (["--test-fraction", "1.5"], "1.5"),
    (["--image-size", "0"], "image_size"),
    (["--max-steps", "many"], "invalid int value: 'many'"),
    (["--run", "{run}/vqvae/config.json/sub"], "config.json"),
]


def run_case(main, argv, folders, capsys):
    before = tree_hashes(folders["run"])
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error:") and err.count("\n") == 0, err
    assert "Traceback" not in err
    assert tree_hashes(folders["run"]) == before
    return err


@pytest.mark.parametrize("argv,expected", VQVAE_CASES, ids=[" ".join(a) for a, _ in VQVAE_CASES])
def test_train_vqvae_bad_input(folders, capsys, argv, expected):
    argv = [a.format(**folders) for a in argv]
    if "--run" not in argv:
        argv += ["--run", str(folders["tmp"] / "new")]
    err = run_case(train_vqvae.main, TINY + argv, folders, capsys)
    assert expected.format(**folders) in err


PRIOR_CASES = [
    (["--run", "{missing}"], "no code grids at {missing}/codes"),
    (["--codes", "{empty}"], "has no meta.json"),
    (["--prior", "lstm"], "invalid choice: 'lstm'"),
    (["--channels", "8"], "do not apply to the transformer prior"),
    (["--d-model", "30", "--n-heads", "4"], "d_model must be divisible by n_heads"),
    (["--resume", "--d-model", "64"], "d_model is 64 here but the saved prior has 32"),
    (["--resume", "--prior", "pixelcnn"], "holds a transformer prior, not a pixelcnn prior"),
    (["--batch-size", "1000"], "batch size 1000 is larger than the 96 training grids"),
    (["--label-dropout", "1.5"], "label_dropout must be in [0, 1), got 1.5"),
    (["--lr", "0"], "learning_rate must be a positive number"),
    (["--max-steps", "-1"], "max_steps must be >= 0, got -1"),
    (["--resume", "--run", "{tmp}/fresh"], "no code grids"),
]


@pytest.mark.parametrize("argv,expected", PRIOR_CASES, ids=[" ".join(a) for a, _ in PRIOR_CASES])
def test_train_prior_bad_input(folders, capsys, argv, expected):
    argv = [a.format(**folders) for a in argv]
    if "--run" not in argv:
        argv += ["--run", str(folders["run"])]
    if "--resume" not in argv:  # a fresh prior would replace the run's: each case must fail before that
        argv = ["--overwrite", "--max-steps", "1"] + argv
    err = run_case(train_prior.main, argv, folders, capsys)
    assert expected.format(**folders) in err


def test_train_prior_refuses_labels_where_there_are_none(folders, capsys):
    from vqgen.core.store.codes import CodesMeta, load_codes, save_codes

    codes = folders["tmp"] / "unlabelled"
    splits, meta = load_codes(folders["run"] / "codes")
    splits = {k: type(v)(codes=v.codes, labels=None) for k, v in splits.items()}
    save_codes(codes, splits, CodesMeta(**{**meta.__dict__, "num_classes": 0, "class_names": ()}))
    err = run_case(train_prior.main, ["--run", str(folders["run"]), "--codes", str(codes), "--conditional",
                                      "--overwrite"],
                   folders, capsys)
    assert f"conditional training asked for, but the codes in {codes} have no labels" in err


def test_encode_refuses_data_with_other_channels(folders, capsys):
    from vqgen.cli import main

    err = run_case(main, ["encode", "--run", str(folders["run"]), "--data", str(folders["gray"])], folders, capsys)
    assert "1x32x32 images but the VQ-VAE" in err and "3x32x32" in err


@pytest.mark.parametrize("argv,expected", [
    (["--augment", "rotate"], "unknown augmentation 'rotate'"),
    (["--code-copies", "3"], "code_copies=3 needs augment"),
    (["--code-copies", "-1", "--augment", "flip"], "code_copies must be >= 0, got -1"),
    (["--patience", "-1"], "patience must be >= 0, got -1"),
], ids=["augment-unknown", "copies-without-augment", "copies-negative", "patience-negative"])
def test_train_vqvae_bad_data_sized_options(folders, capsys, argv, expected):
    err = run_case(train_vqvae.main, TINY + argv + ["--run", str(folders["tmp"] / "new")], folders, capsys)
    assert expected in err
    assert not (folders["tmp"] / "new").exists()


def test_benchmark_data_refuses_a_run_without_test_evaluations_in_one_line(tmp_path):
    bench = load_script("benchmarks/data")
    metrics = tmp_path / "metrics.jsonl"
    for content in (None, '{"split": "train", "step": 1, "mse": 0.1}\n'):
        if content is not None:
            metrics.write_text(content)
        with pytest.raises(SystemExit) as err:
            bench.best_vs_last(metrics, "mse")
        assert str(err.value) == f"error: {metrics} holds no test evaluation; score a run whose stages were evaluated"
    metrics.write_text('{"split": "test", "step": 5, "mse": 0.2, "best_step": 5}\n'
                       '{"split": "test", "step": 10, "mse": 0.3, "best_step": 5}\n')
    result = bench.best_vs_last(metrics, "mse")
    kept = (result["best_step"], result["last_step"], result["kept_step"], result["kept_vs_best_pct"])
    assert kept == (5, 10, 5, 0.0)


def test_the_speed_benchmark_measures_as_the_trainers_run(tmp_path):
    # cuDNN's autotuning off unless asked for (it slowed the 256 px step on an H100), and recorded in the JSON
    speed = load_script("benchmarks/speed")
    assert speed.parse_args([]).cudnn_benchmark is False
    assert speed.parse_args(["--cudnn-benchmark"]).cudnn_benchmark is True
    out = tmp_path / "speed.json"
    assert speed.main(["--cpu", "--only", "stage1", "--sizes", "32", "--stage1-batch", "4", "--steps", "1",
                       "--warmup", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["info"]["cudnn_benchmark"] is False
    (row,) = result["stage1"]
    assert (row["size"], row["batch"], row["architecture"]) == (32, 4, "paper") and row["img_per_s"] > 0


def test_the_speed_benchmark_times_the_adversarial_step_and_each_kind_of_prior(tmp_path):
    # --adversarial adds the discriminator (its parameters counted) and its step; the masked prior trains on
    # its own objective and samples once per --fill-steps, capped at the grid's codes; a raster prior once
    speed = load_script("benchmarks/speed")
    out = tmp_path / "speed.json"
    common = ["--cpu", "--sizes", "32", "--stage1-batch", "2", "--steps", "1", "--warmup", "0", "--out", str(out)]
    assert speed.main([*common, "--only", "stage1"]) == 0
    (plain,) = json.loads(out.read_text())["stage1"]
    assert speed.main([*common, "--only", "stage1", "prior", "sampling", "--adversarial", "--grids", "4",
                       "--priors", "transformer", "masked", "--prior-batch", "2", "--samples", "2",
                       "--fill-steps", "2", "99"]) == 0
    result = json.loads(out.read_text())
    (adversarial,) = result["stage1"]
    assert (plain["terms"], adversarial["terms"]) == ("mse", "mse+adv+ms_ssim")
    assert adversarial["params_m"] > plain["params_m"] and adversarial["tflop_per_step"] > plain["tflop_per_step"]
    assert [(r["prior"], r["codes_per_s"] > 0) for r in result["prior"]] == [("transformer", True), ("masked", True)]
    assert [(r["prior"], r["steps"]) for r in result["sampling"]] == [("transformer", 16), ("masked", 2),
                                                                    ("masked", 16)]


def test_a_folder_smaller_than_the_default_batch_trains_both_stages_at_its_size(tmp_path):
    # 12 images: 11 train / 1 test at the default 0.1 held out; the default batches are 32 and 32
    (tmp_path / "few").mkdir()
    for i in range(12):
        Image.new("RGB", (16, 16), (i * 20, 40, 200 - i * 10)).save(tmp_path / "few" / f"{i}.png")
    run = tmp_path / "run"
    small = ["--hidden-channels", "16", "--res-channels", "8", "--codebook-size", "16", "--code-dim", "8",
             "--max-steps", "2"]
    assert train_vqvae.main(["--data", str(tmp_path / "few"), "--run", str(run), *small]) == 0
    assert json.loads((run / "vqvae" / "train_config.json").read_text())["batch_size"] == 11
    assert train_prior.main(["--run", str(run), "--max-steps", "2", "--d-model", "16", "--n-layers", "1",
                             "--n-heads", "2"]) == 0
    assert json.loads((run / "prior" / "train_config.json").read_text())["batch_size"] == 11


def test_stage_1_trains_at_the_default_recipe_unless_told_otherwise(tmp_path):
    # batch 32 at lr 2e-3 (docs/defaults.md): what a run given neither option saves and trains with
    (tmp_path / "imgs").mkdir()
    for i in range(40):
        Image.new("RGB", (16, 16), (i * 6, 40, 200 - i * 4)).save(tmp_path / "imgs" / f"{i}.png")
    small = ["--data", str(tmp_path / "imgs"), "--hidden-channels", "16", "--res-channels", "8", "--codebook-size",
             "16", "--code-dim", "8", "--max-steps", "2", "--no-encode"]
    assert train_vqvae.main([*small, "--run", str(tmp_path / "default")]) == 0
    saved = json.loads((tmp_path / "default" / "vqvae" / "train_config.json").read_text())
    assert (saved["batch_size"], saved["learning_rate"]) == (32, 2e-3)
    assert train_vqvae.main([*small, "--run", str(tmp_path / "given"), "--batch-size", "8", "--lr", "1e-3"]) == 0
    saved = json.loads((tmp_path / "given" / "vqvae" / "train_config.json").read_text())
    assert (saved["batch_size"], saved["learning_rate"]) == (8, 1e-3)


def test_the_conditions_benchmark_scores_each_condition_on_one_stage_1(tiny_run, tmp_path, capsys):
    """Two dumps of the tiny run's codes (its classes; clusters with the labels hidden), a prior on each,
    one judge for both; the table has a row per condition and the clusters get no class accuracy."""
    bench = load_script("benchmarks/conditions")
    out = tmp_path / "conditions"
    bench.main(["--run", str(tiny_run), "--out", str(out), "--condition", "labels=--class-clusters,0",
                "--condition", "clusters=--label-column,none,--pseudo-classes,3", "--prior-steps", "2",
                "--prior-args=--d-model,16,--n-layers,1,--n-heads,2", "--samples", "8", "--seeds", "1",
                "--judge-steps", "5"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| labels") or
            line.startswith("| clusters")]
    assert len(rows) == 2 and "| — |" in rows[1] and "| — |" not in rows[0]
    result = json.loads((out / "conditions.json").read_text())["results"]
    assert set(result) == {"labels", "clusters"} and len(result["labels"]["fid_per_seed"]) == 1
    judges = [(out / name / "judge" / "model.safetensors").read_bytes() for name in ("labels", "clusters")]
    assert judges[0] == judges[1]  # trained once, shared


def test_the_speed_benchmarks_vqgan_trunk_is_the_f16_tokenizer_of_vqgan():
    speed = load_script("benchmarks/speed")
    cfg = speed.stage1_config(256, "vqgan")
    assert (cfg.architecture, cfg.hidden_channels, cfg.num_res_blocks, cfg.attention) == ("resnet", 128, 2, True)
    assert (cfg.downsample, cfg.level_mults, cfg.grid_shape) == (16, (1, 1, 2, 2, 4), (16, 16))
    small = speed.stage1_config(64, "vqgan")
    assert (small.downsample, small.level_mults) == (8, (1, 2, 2, 4))
    assert speed.stage1_config(256).hidden_channels == 32  # the preset's


def test_the_speed_benchmark_counts_a_steps_flops_and_its_utilisation():
    speed = load_script("benchmarks/speed")
    layer, x = torch.nn.Linear(8, 4), torch.randn(16, 8)
    # forward: 2*16*8*4 multiply-adds counted as FLOPs; backward: the weight's gradient, as many (x needs none)
    assert speed.step_flops(lambda: layer(x).sum().backward()) == 2 * (2 * 16 * 8 * 4)
    q, k, v = torch.randn(3, 1, 2, 8, 4).unbind(0)  # attention counted on the CPU too: q k^T and (.) v
    attend = torch.nn.functional.scaled_dot_product_attention
    assert speed.step_flops(lambda: attend(q, k, v)) == 2 * (2 * 2 * 8 * 8 * 4)
    args = speed.parse_args(["--peak-tflops", "10"])
    assert speed.utilisation(4e12, 2.0, args, torch.device("cpu")) == {
        "tflop_per_step": 4.0, "achieved_tflops": 2.0, "mfu": 0.2}
    assert speed.utilisation(4e12, 2.0, speed.parse_args([]), torch.device("cpu"))["mfu"] is None  # no peak known


def test_the_pipeline_benchmark_streams_a_jpeg_folder_and_sizes_the_workers(tmp_path):
    pytest.importorskip("skimage")
    pipeline = load_script("benchmarks/pipeline")
    pipeline.main(["--out", str(tmp_path), "--images", "12", "--source-size", "96x64", "--size", "32",
                   "--batch-size", "4", "--workers", "0,1", "--card-img-s", "1e9"])
    files = sorted((tmp_path / "jpegs_96x64_q90_12").iterdir())
    assert len(files) == 12 and Image.open(files[0]).size == (96, 64)
    result = json.loads((tmp_path / "pipeline.json").read_text())
    assert result["one_worker_img_s"] > 0 and set(result["loader_img_s_by_workers"]) == {"0", "1"}
    assert result["workers_needed"]["1000000000.0"] == math.ceil(1e9 / result["one_worker_img_s"])
