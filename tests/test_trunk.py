"""The scalable trunk (architecture "resnet"): shapes at every level, training, its config and its errors."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import load_script
from stage1_vqvae.config import VQVAEConfig
from stage1_vqvae.model import VQVAE
from stage1_vqvae.trunk import AttnBlock, ResnetDecoder, ResnetEncoder
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store.configs import config_to_dict, load_config, save_config
from vqgen.core.store.weights import load_model, save_model


def tiny(**kw) -> VQVAEConfig:
    base = dict(architecture="resnet", hidden_channels=4, num_res_blocks=1, codebook_size=8, code_dim=4,
                image_height=32, image_width=32, kmeans_init=False)
    return VQVAEConfig(**{**base, **kw})


def level_outputs(levels, x) -> list[torch.Size]:
    shapes = []
    for level in levels:
        x = level(x)
        shapes.append(x.shape)
    return shapes


@pytest.mark.parametrize("downsample,mults", [(4, (1, 2, 3)), (8, (1, 1, 2, 4)), (16, (1, 2, 2, 3, 4))])
@pytest.mark.parametrize("attention", [False, True])
def test_every_level_has_its_width_and_side(downsample, mults, attention):
    cfg = tiny(downsample=downsample, channel_mult=mults, attention=attention, image_height=32, image_width=48)
    enc = ResnetEncoder(3, 4, mults, 1, attention, 5)
    dec = ResnetDecoder(3, 4, mults, 1, attention, 5)
    x = torch.randn(2, 3, 32, 48)
    # encoder level i ends halved (but the last): (b, 4 * mults[i], 32 / 2^(i+1), 48 / 2^(i+1))
    down = level_outputs(enc.levels, enc.conv_in(x))
    last = len(mults) - 1
    assert down == [torch.Size([2, 4 * m, 32 >> min(i + 1, last), 48 >> min(i + 1, last)]) for i, m in enumerate(mults)]
    z = enc(x)
    assert z.shape == (2, 5, 32 // downsample, 48 // downsample)
    # decoder level j works on level i = last - j, then doubles the side (but for level 0)
    up = level_outputs(dec.levels, dec.middle(dec.conv_in(z)))
    expected = [torch.Size([2, 4 * mults[last - j], 32 >> max(last - j - 1, 0), 48 >> max(last - j - 1, 0)])
                for j in range(len(mults))]
    assert up == expected
    assert dec(z).shape == x.shape
    assert any(isinstance(m, AttnBlock) for m in enc.modules()) == attention
    model = VQVAE(cfg)
    assert model(x).recon.shape == x.shape
    assert model.encode(x).shape == (2, 32 // downsample, 48 // downsample)


@pytest.mark.parametrize("downsample,patch,mults", [(8, 2, (1, 2, 2)), (8, 4, (1, 2)), (4, 4, (1,))])
def test_a_patch_fold_starts_the_levels_at_a_pth_of_the_side_and_no_conv_sees_full_resolution(downsample, patch, mults):
    cfg = tiny(downsample=downsample, patch_size=patch, channel_mult=mults, image_height=32, image_width=48)
    model = VQVAE(cfg)
    sides = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d) and "linear_path" not in name:
            module.register_forward_hook(lambda m, args, out, name=name: sides.append((name, args[0].shape[-2:])))
    x = torch.randn(2, 3, 32, 48)
    assert model(x).recon.shape == x.shape
    assert model.encode(x).shape == (2, 32 // downsample, 48 // downsample)
    # the trunk's first conv takes the folded image, its last predicts the values the shuffle unfolds
    assert model.encoder.conv_in.in_channels == 3 * patch * patch
    assert model.decoder.conv_out[-1].out_channels == 3 * patch * patch
    assert sides and all(side[0] <= 32 // patch and side[1] <= 48 // patch for _, side in sides)
    assert dict(sides)["encoder.conv_in"] == (32 // patch, 48 // patch)


def test_the_patch_fold_round_trips_the_pixels_and_keeps_the_linear_path():
    """Silence the trunk: the decoder is the linear path, the pooled colour of each code's f x f pixels, at
    every fold; and the fold itself loses nothing (the decoder's last conv sees every value of a patch)."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(F.pixel_shuffle(F.pixel_unshuffle(x, 4), 4), x)
    model = VQVAE(tiny(downsample=8, patch_size=4, channel_mult=(1, 2))).eval()
    encoder, decoder = model.encoder, model.decoder
    with torch.no_grad():
        for last in (encoder.conv_out[-1], decoder.conv_out[-1]):
            last.weight.zero_()
            last.bias.zero_()
        z = encoder(x)
        assert torch.allclose(z, encoder.linear_path(F.avg_pool2d(x, 8)), atol=1e-6)
        expected = F.interpolate(decoder.linear_path(z), scale_factor=8, mode="bilinear")
        assert torch.allclose(decoder(z), expected, atol=1e-6)


def test_a_patch_fold_takes_halvings_from_the_default_levels():
    assert tiny(downsample=8, patch_size=2).level_mults == (1, 2, 2)
    assert tiny(downsample=8, patch_size=8).level_mults == (1,)
    assert tiny(downsample=8).patch_size == 1 and tiny(downsample=8).level_mults == (1, 2, 2, 4)


def test_a_patched_config_round_trips_and_a_format_4_file_loads_without_a_fold(tmp_path):
    cfg = tiny(downsample=8, patch_size=4, channel_mult=(1, 2))
    save_config(cfg, tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["patch_size"] == 4 and load_config(VQVAEConfig, tmp_path / "config.json") == cfg
    old = {k: v for k, v in config_to_dict(tiny(downsample=8)).items() if k != "patch_size"}
    (tmp_path / "old.json").write_text(json.dumps({**old, "format_version": 4}))
    assert load_config(VQVAEConfig, tmp_path / "old.json") == tiny(downsample=8)
    (tmp_path / "old.json").write_text(json.dumps(old))  # a version-5 file must carry it
    with pytest.raises(VQGenError, match=r"missing fields \['patch_size'\]"):
        load_config(VQVAEConfig, tmp_path / "old.json")


def test_empty_channel_mult_doubles_every_second_level():
    assert tiny(downsample=4).level_mults == (1, 2, 2)
    assert tiny(downsample=16).level_mults == (1, 2, 2, 4, 4)
    assert tiny(downsample=8, channel_mult=(1, 1, 1, 1)).level_mults == (1, 1, 1, 1)


def test_zero_residual_blocks_still_reach_each_width():
    model = VQVAE(tiny(downsample=4, channel_mult=(1, 2, 4), num_res_blocks=0))
    x = torch.randn(2, 3, 32, 32)
    assert model(x).recon.shape == x.shape


def test_attention_mixes_the_whole_grid():
    """Changing one position changes the attention block's output everywhere; without it, a 3x3 trunk's
    lowest level sees only its neighbourhood."""
    torch.manual_seed(0)
    block = AttnBlock(4)
    x = torch.randn(1, 4, 6, 6)
    y = x.clone()
    y[0, :, 0, 0] += 1.0
    diff = (block(x) - block(y)).abs().sum(1)[0]  # (h, w)
    assert (diff > 0).all()


def test_the_resnet_vqvae_trains_through_the_straight_through_estimator():
    torch.manual_seed(0)
    model = VQVAE(tiny(downsample=4, attention=True))
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        out = model(x)
        optimizer.zero_grad()
        out.loss.backward()
        if not losses:  # the decoder's gradient reached the encoder's first conv through the quantizer
            assert model.encoder.conv_in.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(out.recon_loss.item())
    assert losses[-1] < losses[0]


def test_a_resnet_config_round_trips_and_rebuilds_the_same_model(tmp_path):
    cfg = tiny(downsample=8, channel_mult=(1, 2, 2, 4), attention=True)
    save_config(cfg, tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["channel_mult"] == [1, 2, 2, 4]
    loaded = load_config(VQVAEConfig, tmp_path / "config.json")
    assert loaded == cfg and loaded.channel_mult == (1, 2, 2, 4)
    torch.manual_seed(0)
    a = VQVAE(cfg)
    torch.manual_seed(0)
    b = VQVAE(loaded)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_a_format_2_file_loads_as_the_paper_net(tmp_path):
    data = config_to_dict(VQVAEConfig(codebook_size=8, code_dim=4, hidden_channels=8, res_channels=4))
    old = {k: v for k, v in data.items() if k not in ("architecture", "channel_mult", "attention")}
    (tmp_path / "config.json").write_text(json.dumps({**old, "format_version": 2}))
    cfg = load_config(VQVAEConfig, tmp_path / "config.json")
    assert (cfg.architecture, cfg.channel_mult, cfg.attention) == ("paper", (), False)
    assert not any(isinstance(m, ResnetEncoder) for m in VQVAE(cfg).modules())
    (tmp_path / "config.json").write_text(json.dumps(old))  # a version-3 file must carry them
    with pytest.raises(VQGenError, match="missing fields"):
        load_config(VQVAEConfig, tmp_path / "config.json")


@pytest.mark.parametrize("downsample", [4, 8])
def test_the_linear_path_is_the_pooled_image_in_and_the_upsampled_code_out(downsample):
    torch.manual_seed(0)
    model = VQVAE(tiny(downsample=downsample)).eval()
    encoder, decoder = model.encoder, model.decoder
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        trunk_z = encoder(x) - encoder.linear_path(F.avg_pool2d(x, downsample))
        for last in (encoder.conv_out[-1], decoder.conv_out[-1]):  # silence the trunks: the linear path is left
            last.weight.zero_()
            last.bias.zero_()
        z = encoder(x)
        assert torch.allclose(z, encoder.linear_path(F.avg_pool2d(x, downsample)), atol=1e-6)
        assert trunk_z.abs().max() > 1e-3  # the trunk did contribute before it was silenced
        expected = F.interpolate(decoder.linear_path(z), scale_factor=downsample, mode="bilinear")
        assert torch.allclose(decoder(z), expected, atol=1e-6)


def test_new_resnet_runs_get_the_linear_path_and_format_3_runs_load_without_it(tmp_path):
    assert tiny().linear_path and any(n.endswith("linear_path.weight") for n, _ in VQVAE(tiny()).named_parameters())
    cfg = tiny(linear_path=False)
    model = VQVAE(cfg).eval()
    save_model(model, cfg, tmp_path / "vqvae")
    data = json.loads((tmp_path / "vqvae" / "config.json").read_text())
    del data["linear_path"]
    (tmp_path / "vqvae" / "config.json").write_text(json.dumps({**data, "format_version": 3}))
    loaded = load_model(VQVAE, VQVAEConfig, tmp_path / "vqvae").eval()
    assert loaded.config.linear_path is False
    codes = torch.randint(8, (2, 8, 8))
    assert torch.equal(loaded.decode(codes), model.decode(codes))
    (tmp_path / "vqvae" / "config.json").write_text(json.dumps(data))  # a version-4 file must carry it
    with pytest.raises(VQGenError, match=r"missing fields \['linear_path'\]"):
        load_model(VQVAE, VQVAEConfig, tmp_path / "vqvae")


@pytest.mark.parametrize("kw,message", [
    (dict(downsample=8, channel_mult=(1, 2, 4)),
     "channel_mult 1,2,4 has 3 levels but downsample 8 needs 4 (one more than its 3 halvings)"),
    (dict(downsample=4, channel_mult=(1, 0, 2)), "channel_mult must hold integers >= 1, got 1,0,2"),
    (dict(architecture="paper", channel_mult=(1, 2, 2)),
     "channel_mult 1,2,2 applies to architecture resnet only, got architecture paper"),
    (dict(architecture="paper", attention=True), "attention applies to architecture resnet only"),
    (dict(architecture="unet"), "architecture must be one of paper, resnet, got 'unet'"),
    (dict(downsample=16, image_height=40),
     "image height 40 is not divisible by the downsampling factor 16"),
    (dict(downsample=8, patch_size=3), "patch_size must be a power of two from 1 to downsample=8, got 3"),
    (dict(downsample=8, patch_size=16), "patch_size must be a power of two from 1 to downsample=8, got 16"),
    (dict(downsample=8, patch_size=0), "patch_size must be a power of two from 1 to downsample=8, got 0"),
    (dict(architecture="paper", patch_size=2), "patch_size 2 applies to architecture resnet only"),
    (dict(downsample=8, patch_size=4, channel_mult=(1, 2, 2)),
     "channel_mult 1,2,2 has 3 levels but downsample 8 with patch_size 4 needs 2 (one more than its 1 halvings)"),
])
def test_a_wrong_trunk_is_refused_by_name(kw, message):
    with pytest.raises(VQGenError) as err:
        tiny(**kw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_wrong_trunk_in_a_saved_config_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    save_config(tiny(downsample=4), path)
    path.write_text(json.dumps({**json.loads(path.read_text()), "channel_mult": [1, 2]}))
    with pytest.raises(VQGenError, match=r"config.json: channel_mult 1,2 has 2 levels but downsample 4 needs 3"):
        load_config(VQVAEConfig, path)
    path.write_text(json.dumps({**json.loads(path.read_text()), "channel_mult": "1,2,2"}))
    with pytest.raises(VQGenError, match=r'channel_mult must be a list, got "1,2,2"'):
        load_config(VQVAEConfig, path)


def test_the_cli_parses_a_channel_mult_list(capsys):
    from vqgen.arguments import VQVAE_FROM_DATA, given_options

    script = load_script("train_vqvae")
    args = script.parse_args(["--architecture", "resnet", "--channel-mult", "1,2,2,4", "--attention"])
    given = given_options(args, VQVAEConfig, skip=VQVAE_FROM_DATA)
    assert given == {"architecture": "resnet", "channel_mult": (1, 2, 2, 4), "attention": True}
    assert dataclasses.replace(tiny(), downsample=8, **given).level_mults == (1, 2, 2, 4)
    with pytest.raises(SystemExit) as stop:
        script.parse_args(["--channel-mult", "1,two"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--channel-mult" in err and "1,two" in err and len(err.strip().splitlines()) == 1


def test_a_preset_fills_only_the_options_not_given():
    from stage1_vqvae.config import PRESETS, preset_options

    assert preset_options(None, {"code_dim": 8}) == {"code_dim": 8}
    assert preset_options("128", {}) == PRESETS["128"]
    options = preset_options("128", {"hidden_channels": 8, "attention": True})
    assert options == {**PRESETS["128"], "hidden_channels": 8, "attention": True}
    # a given downsample drops the preset's levels; a given paper architecture its resnet-only options
    assert "channel_mult" not in preset_options("128", {"downsample": 4})
    assert "channel_mult" not in preset_options("128", {"patch_size": 2})
    folded = VQVAEConfig(image_height=128, image_width=128, **preset_options("128", {"patch_size": 2}))
    assert folded.level_mults == (1, 2, 2)
    assert preset_options("256", {"architecture": "paper"}) == {"architecture": "paper", "downsample": 16,
                                                                "hidden_channels": 32, "num_res_blocks": 2}
    with pytest.raises(VQGenError, match="preset must be one of 32, 64, 128, 256, got '48'"):
        preset_options("48", {})


@pytest.mark.parametrize("side", [32, 64, 128, 256])
def test_every_preset_builds_at_its_side(side):
    from stage1_vqvae.config import PRESETS

    cfg = VQVAEConfig(image_height=side, image_width=side, **PRESETS[str(side)])
    assert cfg.grid_shape == ((8, 8) if side == 32 else (16, 16))


@pytest.mark.parametrize("options,message", [
    (["--channel-mult", "1,2"], "channel_mult 1,2 has 2 levels but downsample 4 needs 3"),
    (["--preset", "128", "--image-size", "36"], "image height 36 is not divisible by the downsampling factor 8"),
    (["--patch-size", "3"], "patch_size must be a power of two from 1 to downsample=4, got 3"),
])
def test_a_wrong_trunk_on_the_command_line_writes_nothing(tmp_path, capsys, options, message):
    script = load_script("train_vqvae")
    run = tmp_path / "run"
    argv = ["--run", str(run), "--builtin-train-size", "32", "--builtin-test-size", "16", "--architecture",
            "resnet", *options]
    assert script.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not run.exists()


def test_the_photo_benchmark_trains_both_trunks_for_its_budget(tmp_path):
    if os.environ.get("CI") != "true":  # the test extra installs scikit-image: in CI a missing one is a failure
        pytest.importorskip("skimage")
    bench = load_script("benchmarks/photos")
    out = tmp_path / "photos.json"
    argv = ["--sizes", "64", "--budget", "0.3", "--batch-size", "2", "--test-crops", "2", "--out", str(out)]
    assert bench.main(argv) == 0
    summary = json.loads(out.read_text())
    assert (summary["train_photos"], summary["test_photos"]) == (list(bench.TRAIN_PHOTOS), list(bench.TEST_PHOTOS))
    rows = summary["results"]
    assert [(r["size"], r["trunk"], r["config"]["architecture"]) for r in rows] == [
        (64, "paper", "paper"), (64, "resnet", "resnet")]
    assert all(r["config"]["downsample"] == 4 for r in rows)  # the same 16x16 grid for both
    assert all(r["steps"] >= 1 and r["budget_used_s"] >= 0.3 and r["test_psnr"] > 0 for r in rows)
    assert not set(bench.TRAIN_PHOTOS) & set(bench.TEST_PHOTOS)


def test_the_photo_benchmark_sizes_the_resnet_trunk_from_its_options_and_refuses_bad_ones(tmp_path, capsys):
    bench = load_script("benchmarks/photos")
    args = bench.parse_args(["--resnet-width", "16", "--resnet-mult", "1,2,2,4", "--resnet-blocks", "0"])
    resnet = bench.resnet_overrides(args)
    cfg = bench.model_config("resnet", 128, 16, resnet)
    assert (cfg.hidden_channels, cfg.channel_mult, cfg.num_res_blocks, cfg.downsample) == (16, (1, 2, 2, 4), 0, 8)
    assert bench.model_config("paper", 128, 16, resnet).architecture == "paper"  # the paper net is untouched
    folded = bench.model_config("resnet", 128, 16, bench.resnet_overrides(bench.parse_args(["--resnet-patch", "4"])))
    assert (folded.patch_size, folded.level_mults) == (4, (1, 2))  # the preset's four levels give way to two
    out = tmp_path / "photos.json"
    for bad, message in ((["--resnet-mult", "1,2"], "channel_mult 1,2 has 2 levels but downsample 8 needs 4"),
                         (["--resnet-mult", "1,x"], "--resnet-mult must be a comma list of integers")):
        assert bench.main(["--sizes", "128", *bad, "--out", str(out)]) != 0
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # refused before any training or writing


def test_the_photo_benchmark_holds_out_whole_photos_and_refuses_a_split_that_does_not(tmp_path, capsys):
    bench = load_script("benchmarks/photos")
    assert bench.photo_split("a.png,b.png,c.png", "d.png") == (("a.png", "b.png", "c.png"), ("d.png",))
    out = tmp_path / "photos.json"
    for bad, message in ((["--train-photos", "a.png,b.png", "--test-photos", "b.png"],
                          "b.png is in both --train-photos and --test-photos"),
                         (["--test-photos", ","], "--train-photos and --test-photos must each name a photo"),
                         (["--train-photos", "a.png", "--test-photos", "b.png", "--photo-dir", str(tmp_path)],
                          f"no photo 'a.png' in {tmp_path} (the photos there: none)")):
        assert bench.main(["--sizes", "64", *bad, "--out", str(out)]) != 0
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("channels, groups", [(4, 1), (8, 1), (16, 2), (32, 4), (64, 8), (128, 16), (256, 32), (512, 32),
                                              (96, 4)])
def test_group_norm_never_normalises_a_channel_alone(channels, groups):
    """At least 8 channels per group (at most 32 groups): a group of one channel would erase that channel's
    mean over the image, i.e. its colour, which the narrow presets' first levels then could not reproduce."""
    from stage1_vqvae.trunk import group_norm

    norm = group_norm(channels)
    assert norm.num_groups == groups and channels % norm.num_groups == 0
    assert channels // norm.num_groups >= min(8, channels)
