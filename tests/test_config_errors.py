"""A saved config with a value of the wrong kind is one line naming the file, the field and the value."""

import json
import shutil

import pytest

from stage1_vqvae.config import VQVAEConfig
from stage1_vqvae.model import VQVAE
from stage2_prior.registry import PRIORS
from vqgen.cli import main
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store.codes import CodesMeta
from vqgen.core.store.configs import config_to_dict, load_config, save_config
from vqgen.core.store.weights import save_model
from vqgen.core.training.config import TrainConfig

CASES = [
    (VQVAEConfig, "codebook_size", "512", 'codebook_size must be an integer, got "512"'),
    (VQVAEConfig, "codebook_size", True, "codebook_size must be an integer, got true"),
    (VQVAEConfig, "code_dim", 64.0, "code_dim must be an integer, got 64.0"),
    (VQVAEConfig, "beta", float("nan"), "beta must be a finite number, got NaN"),
    (VQVAEConfig, "beta", float("inf"), "beta must be a finite number, got Infinity"),
    (VQVAEConfig, "beta", "0.25", 'beta must be a number, got "0.25"'),
    (VQVAEConfig, "kmeans_init", 1, "kmeans_init must be true or false, got 1"),
    (VQVAEConfig, "codebook_update", "kmeans", 'codebook_update must be one of loss, ema, got "kmeans"'),
    (VQVAEConfig, "hidden_channels", -8, "hidden_channels must be >= 1, got -8"),
    (VQVAEConfig, "in_channels", None, "in_channels must be an integer, got null"),
    (TrainConfig, "mixed_precision", "fp8", 'mixed_precision must be one of no, fp16, bf16, got "fp8"'),
    (TrainConfig, "learning_rate", -1e300 * 1e300, "learning_rate must be a finite number, got -Infinity"),
    (TrainConfig, "batch_size", 0, "batch_size must be >= 1, got 0"),
    (TrainConfig, "keep", [2], "keep must be an integer, got [2]"),
    (PRIORS["transformer"].config, "n_heads", "2", 'n_heads must be an integer, got "2"'),
    (PRIORS["pixelcnn"].config, "num_classes", -1, "num_classes must be >= 0, got -1"),
]


def saved(cls):
    if cls is VQVAEConfig:
        return VQVAEConfig(codebook_size=8, code_dim=4, hidden_channels=8, res_channels=4)
    if cls is TrainConfig:
        return TrainConfig()
    return cls(codebook_size=16, grid_height=8, grid_width=8)


@pytest.mark.parametrize("cls,name,value,message", CASES, ids=[f"{c.__name__}.{n}={v!r}" for c, n, v, _ in CASES])
def test_a_wrong_value_names_the_file_and_the_field(tmp_path, cls, name, value, message):
    path = tmp_path / "config.json"
    save_config(saved(cls), path)
    path.write_text(json.dumps({**json.loads(path.read_text()), name: value}))
    with pytest.raises(VQGenError) as err:
        load_config(cls, path)
    assert str(err.value) == f"{path}: {message}"


def test_nested_tuples_are_checked_and_rebuilt(tmp_path):
    meta = CodesMeta(16, 8, 8, 2, ("a", "b"), "f" * 16, "d", "builtin", 3, 32, 32, (("train", 5), ("test", 3)))
    path = tmp_path / "meta.json"
    save_config(meta, path)
    assert load_config(CodesMeta, path) == meta  # lists back to tuples, nested ones too
    good = json.loads(path.read_text())
    for field, value, message in (("split_sizes", [["train", "5"]], "split_sizes must be a list whose items are"),
                                  ("class_names", "ab", 'class_names must be a list, got "ab"'),
                                  ("image_channels", 0, "image_channels must be >= 1, got 0")):
        path.write_text(json.dumps({**good, field: value}))
        with pytest.raises(VQGenError, match=f"^{path}: {message}"):
            load_config(CodesMeta, path)
    path.write_text("[1, 2]")
    with pytest.raises(VQGenError, match="holds list JSON, expected an object"):
        load_config(CodesMeta, path)


def test_commands_refuse_a_run_with_a_bad_config_in_one_line(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    path = run / "vqvae" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "codebook_size": "16"}))
    assert main(["sample", "--run", str(run), "--n", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f'error: {path}: codebook_size must be an integer, got "16"'


def test_a_config_saved_by_this_version_loads_back(tmp_path):
    cfg = saved(VQVAEConfig)
    save_model(VQVAE(cfg), cfg, tmp_path)
    assert load_config(VQVAEConfig, tmp_path / "config.json") == cfg
    assert config_to_dict(cfg)["kind"] == "VQVAEConfig"
