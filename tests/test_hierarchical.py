"""The hierarchical-codes benchmark (scripts/benchmarks/hierarchical.py): its two-level VQ-VAE, its stacked code
dump and the scoring of a prior over it."""

import json

import pytest
import torch
from einops import rearrange

from conftest import TINY_VQVAE, load_script, tiny_train
from stage1_vqvae.config import VQVAEConfig
from stage2_prior.train import train_prior
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store.codes import load_codes
from vqgen.core.store.configs import save_config
from vqgen.core.store.layout import RunLayout

hier = load_script("benchmarks/hierarchical")

CFG = VQVAEConfig(**TINY_VQVAE, image_height=32, image_width=32)  # an 8x8 bottom grid of K=16, a 4x4 top grid


def tiny_model(top: int = 8) -> "hier.TwoLevelVQVAE":
    torch.manual_seed(0)
    return hier.TwoLevelVQVAE(CFG, top)


def test_stacked_grids_hold_the_top_codes_past_k_in_the_first_rows_then_the_bottom_grid():
    model = tiny_model()
    top, bottom = torch.randint(0, 8, (3, 4, 4)), torch.randint(0, 16, (3, 8, 8))
    grids = model.stack(top, bottom)
    assert grids.shape == (3, 10, 8) and model.top_rows == 2
    assert torch.equal(rearrange(grids[:, :2], "n a b -> n (a b)"), rearrange(top, "n a b -> n (a b)") + 16)
    assert torch.equal(grids[:, 2:], bottom)
    back_top, back_bottom = model.unstack(grids)
    assert torch.equal(back_top, top) and torch.equal(back_bottom, bottom)
    with pytest.raises(VQGenError, match=r"top codes must lie in \[16, 24\)"):
        model.unstack(torch.zeros(1, 10, 8, dtype=torch.long))  # a bottom id where a top one belongs


def test_encode_then_decode_reads_both_levels_and_reconstructs_as_the_forward_pass():
    model = tiny_model().eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        grids = model.encode(x)
        out = model(x)
        assert grids.shape == (4, 10, 8)
        assert torch.allclose(model.decode(grids), out.recon, atol=1e-5)
        changed = grids.clone()
        changed[:, 0, 0] = 16 + (grids[:, 0, 0] - 16 + 1) % 8  # another top code, every bottom code kept
        assert not torch.allclose(model.decode(changed), out.recon, atol=1e-4)  # the decoder reads the top level


def test_every_part_trains_and_the_gradient_passes_both_quantizers_straight_through():
    model = tiny_model().train()
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    out = model(x)
    out.loss.backward()
    for name in ("bottom_encoder", "top_encoder", "top_decoder", "bottom_in", "top_up", "decoder"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), name
    for quantizer in (model.quantizer, model.top_quantizer):
        assert quantizer.codebook.grad is not None and quantizer.codebook.grad.abs().sum() > 0
    # both levels' codebook and commitment terms are in the loss, beside the reconstruction
    assert torch.allclose(out.loss, out.recon_loss + out.quant.loss)
    model.eval()
    with torch.no_grad():
        top, bottom = model.levels(x)  # the same codebooks: the same terms as in the training pass
    assert torch.allclose(out.quant.loss, top.loss + bottom.loss)
    assert out.quant.loss > top.loss > 0


def test_a_config_the_two_levels_cannot_be_built_from_is_one_line():
    with pytest.raises(VQGenError, match="architecture 'resnet'"):
        hier.check_two_level(VQVAEConfig(**{**TINY_VQVAE, "architecture": "resnet"}, image_height=32, image_width=32))
    with pytest.raises(VQGenError, match="a 6x6 bottom grid"):
        hier.check_two_level(VQVAEConfig(**TINY_VQVAE, image_height=24, image_width=24))


def test_train_writes_a_two_level_stage_and_stacked_codes_with_the_runs_labels(tiny_run, tmp_path):
    out = tmp_path / "hier"
    info = hier.train(tiny_run, out, top_codes=8, max_steps=3)
    base, base_meta = load_codes(RunLayout(tiny_run).codes)
    splits, meta = load_codes(RunLayout(out).codes)
    k, (h, w) = base_meta.codebook_size, (base_meta.grid_height, base_meta.grid_width)
    assert (meta.codebook_size, meta.grid_height, meta.grid_width) == (k + 8, h + info["top_rows"], w)
    model = hier.load_two_level(out)
    for name in ("train", "test"):
        assert torch.equal(splits[name].labels, base[name].labels)
        grids = splits[name].codes.long()
        assert len(grids) == len(base[name].codes)
        top, bottom = model.unstack(grids)  # each level in its own range
        assert top.shape[1:] == (h // 2, w // 2) and bottom.shape[1:] == (h, w)
    assert json.loads((out / "two_level.json").read_text())["top_codes"] == 8
    with pytest.raises(VQGenError, match="already holds"):
        hier.train(tiny_run, out, top_codes=8, max_steps=3)


def test_train_refuses_a_run_whose_codes_hold_augmented_copies(tiny_run, tmp_path):
    import shutil

    from vqgen.core.data.config import DataConfig
    from vqgen.core.store.configs import load_config

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    layout = RunLayout(run).vqvae
    data = load_config(DataConfig, layout.data_config)
    save_config(DataConfig(**{**data.__dict__, "augment": "flip", "code_copies": 1}), layout.data_config)
    with pytest.raises(VQGenError, match="augmented copies"):
        hier.train(run, tmp_path / "out", top_codes=8, max_steps=3)
    assert not (tmp_path / "out").exists()


def test_score_samples_keep_each_level_to_its_codes_and_report_the_ceiling(tiny_run, tmp_path):
    out = tmp_path / "hier"
    hier.train(tiny_run, out, top_codes=8, max_steps=3)
    train_prior(out, "transformer", tiny_train(max_steps=2),
                dict(d_model=32, n_layers=1, n_heads=2, dropout=0.0), allow_vqvae_mismatch=True)
    result = hier.score(tiny_run, out, samples=8, seeds=[0], cfg_scale=1.0, batch_size=8)
    assert result["reconstructed"]["fid"] >= 0 and result["seeds"][0]["fid"] >= 0
    assert 0 <= result["code_round_trip"][0] <= 1 and 0 <= result["reconstructed"]["code_round_trip"] <= 1
    assert json.loads((out / "hierarchical.json").read_text())["settings"]["top_codes"] == 8
    assert (out / "samples.png").is_file()
