"""The adversarial stage 1's pieces: discriminator, GAN losses, adaptive weight, regularisers, augmentation,
perceptual terms and their options. Tiny nets on the CPU."""

import importlib.util
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from stage1_vqvae.adversarial import (
    LeCam,
    adaptive_weight,
    d_accuracy,
    d_hinge_loss,
    d_non_saturating_loss,
    decoder_last_layer,
    frozen,
    g_hinge_loss,
    g_non_saturating_loss,
    gan_losses,
    r1_penalty,
)
from stage1_vqvae.config import (
    DiscriminatorConfig,
    GANConfig,
    VQVAEConfig,
    discriminator_layers,
    logits_side,
    parse_disc_augment,
    receptive_field,
)
from stage1_vqvae.diffaugment import AugmentDraw, apply_augment, augment_pair, draw_augment
from stage1_vqvae.discriminator import PatchDiscriminator
from stage1_vqvae.model import VQVAE
from stage1_vqvae.perceptual import LPIPS_HELP, feature_matching_loss, ms_ssim, ms_ssim_scales, perceptual_loss, ssim
from vqgen.core.runtime.errors import VQGenError

TINY_AE = dict(in_channels=3, image_height=16, image_width=16, hidden_channels=8, res_channels=4, num_res_blocks=1,
               codebook_size=8, code_dim=4, kmeans_init=False)


def images(n=4, c=3, side=16, seed=0):
    return torch.rand(n, c, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def tiny_discriminator(c=3, side=16, **kw):
    return PatchDiscriminator(DiscriminatorConfig(in_channels=c, image_height=side, image_width=side, width=4, **kw))


# -- the discriminator --------------------------------------------------------------------------

def test_depth_follows_the_image_side_as_in_pix2pix_at_256():
    assert [receptive_field(n) for n in (1, 2, 3)] == [16, 34, 70]  # pix2pix's 70x70 PatchGAN at 3
    assert [discriminator_layers(s, s) for s in (28, 32, 64, 128, 256, 512)] == [1, 1, 1, 2, 3, 4]
    assert discriminator_layers(256, 64) == 1  # the shorter side decides
    cfg = DiscriminatorConfig(image_height=128, image_width=128)
    assert cfg.num_layers == 2 and cfg.patch_size == 34
    assert DiscriminatorConfig(image_height=128, image_width=128, layers=3).num_layers == 3


@pytest.mark.parametrize("norm", ["group", "spectral", "none"])
def test_logits_judge_patches_of_the_receptive_field(norm):
    """One logit's gradient reaches exactly a receptive_field-wide square of the input, and no BatchNorm."""
    disc = tiny_discriminator(side=32, norm=norm).double()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in disc.modules())
    x = images(2, side=32).double().requires_grad_(True)
    logits = disc(x)
    assert logits.shape == (2, 1, logits_side(32, 1), logits_side(32, 1)) == (2, 1, 14, 14)
    logits[0, 0, 7, 7].backward()
    assert x.grad[1].abs().sum() == 0  # each image judged alone: no statistics across the batch
    if norm == "group":
        return  # GroupNorm's statistics span the image: a logit's convs see a patch, its scale the image
    support = x.grad[0].abs().sum(0) > 0
    rows, cols = support.any(1).nonzero(), support.any(0).nonzero()
    assert int(rows.max() - rows.min()) + 1 <= receptive_field(1) == 16
    assert int(cols.max() - cols.min()) + 1 > receptive_field(1) - 4  # not much smaller either


def test_discriminator_options_are_refused_in_one_line():
    for kw, message in [(dict(width=0), "width must be >= 1, got 0"),
                        (dict(layers=-1), "layers must be >= 0"),
                        (dict(norm="batch"), "norm must be one of group, spectral, none, got 'batch'"),
                        (dict(layers=4), "layers 4 leaves no logit on 32x32 images: at most 3 fit")]:
        with pytest.raises(VQGenError, match=message) as err:
            DiscriminatorConfig(**kw)
        assert "\n" not in str(err.value)
    with pytest.raises(VQGenError, match="layers 1 leaves no logit on 4x4 images"):
        DiscriminatorConfig(image_height=4, image_width=4)


# -- GAN losses ---------------------------------------------------------------------------------

def test_hinge_and_non_saturating_values_and_signs():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # hinge: real terms relu(1 - r) = 0, 0.5, 2; fake terms relu(1 + f) = 0, 1, 2.5
    assert d_hinge_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3.5 / 3))
    assert g_hinge_loss(fake).item() == pytest.approx(0.5 / 3)  # -mean(-2, 0, 1.5)
    sp = lambda v: math.log1p(math.exp(v))
    assert d_non_saturating_loss(real, fake).item() == pytest.approx(
        0.5 * ((sp(-2) + sp(-0.5) + sp(1)) / 3 + (sp(-2) + sp(0) + sp(1.5)) / 3))
    assert g_non_saturating_loss(fake).item() == pytest.approx((sp(2) + sp(0) + sp(-1.5)) / 3)
    undecided = torch.zeros(3)
    assert d_hinge_loss(undecided, undecided).item() == pytest.approx(1.0)
    assert d_non_saturating_loss(undecided, undecided).item() == pytest.approx(math.log(2))
    # a discriminator sure and right beyond the margin has nothing left to learn under hinge
    assert d_hinge_loss(torch.full((3,), 5.0), torch.full((3,), -5.0)).item() == 0.0
    # signs: the generator gains by raising the fake logits, the discriminator by lowering them
    for d_loss, g_loss in (gan_losses("hinge"), gan_losses("non_saturating")):
        f = fake.clone().requires_grad_(True)
        g_loss(f).backward()
        assert (f.grad < 0).all()
        f.grad = None
        d_loss(real, f).backward()
        assert (f.grad >= 0).all() and f.grad.sum() > 0
    real_acc, fake_acc = d_accuracy(real, fake)
    assert (real_acc.item(), fake_acc.item()) == (pytest.approx(2 / 3), pytest.approx(1 / 3))


# -- the adaptive weight ------------------------------------------------------------------------

def test_adaptive_weight_is_the_ratio_of_the_gradient_norms_at_the_last_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, target = torch.randn(8, 5), torch.randn(8, 3)
    out = net(x)
    rec, adv = F.mse_loss(out, target), -out[:, 0].mean() * 3
    last = net[2].weight
    weight = adaptive_weight(rec, adv, last, base_weight=0.5)
    # independently: each loss's gradient at the last layer through a backward pass of its own
    grads = []
    for loss_fn in (lambda o: F.mse_loss(o, target), lambda o: -o[:, 0].mean() * 3):
        net.zero_grad()
        loss_fn(net(x)).backward()
        grads.append(last.grad.norm().item())
    assert weight.item() == pytest.approx(0.5 * grads[0] / (grads[1] + 1e-4), rel=1e-5)
    assert not weight.requires_grad
    (rec + weight * adv).backward()  # the graphs were kept for the full loss
    # a scaled loss (fp16) gives the same ratio; a vanishing adversarial gradient hits the clamp
    out = net(x)
    scaled = adaptive_weight(F.mse_loss(out, target), -out[:, 0].mean() * 3, last, 0.5, loss_scale=1024.0)
    assert scaled.item() == pytest.approx(weight.item(), rel=1e-4)
    out = net(x)
    assert adaptive_weight(F.mse_loss(out, target) * 1e6, out.sum() * 0, last, max_weight=1e4).item() == 1e4


@pytest.mark.parametrize("trunk", [dict(), dict(architecture="resnet", patch_size=2),
                                   dict(architecture="resnet", linear_path=False)])
def test_the_decoders_last_layer_is_found_for_both_trunks(trunk):
    model = VQVAE(VQVAEConfig(**{**TINY_AE, **trunk}))
    weight = decoder_last_layer(model)
    assert any(weight is p for p in model.decoder.parameters())
    out = model(images())
    grad, = torch.autograd.grad(out.recon_loss, weight)
    assert grad.abs().sum() > 0
    # it is the conv the pixels come out of: changing it changes every output pixel's trunk part
    patch = trunk.get("patch_size", 1)
    out_channels = weight.shape[1] if trunk == {} else weight.shape[0]  # ConvTranspose2d: (in, out, k, k)
    assert out_channels == 3 * patch * patch


# -- no gradient leaks between the two models ---------------------------------------------------

def test_each_loss_moves_only_its_own_model():
    torch.manual_seed(0)
    model, disc = VQVAE(VQVAEConfig(**TINY_AE)), tiny_discriminator()
    x = images()
    d_loss_fn, g_loss_fn = gan_losses("hinge")
    # generator phase: the discriminator frozen, its .grad untouched
    out = model(x)
    with frozen(disc):
        g_adv = g_loss_fn(disc(augment_pair(x, out.recon, ("color", "translation", "cutout"))[1]))
    weight = adaptive_weight(out.recon_loss, g_adv, decoder_last_layer(model))
    (out.loss + weight * g_adv).backward()
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.requires_grad for p in disc.parameters())  # unfrozen again
    assert decoder_last_layer(model).grad.abs().sum() > 0
    assert model.encoder.net[0].weight.grad.abs().sum() > 0  # through the quantizer's straight-through
    # discriminator phase: the reconstructions detached, the autoencoder's .grad untouched
    model.zero_grad(set_to_none=True)
    real, fake = augment_pair(x, out.recon.detach(), ("color", "translation", "cutout"))
    d_loss_fn(disc(real), disc(fake)).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in disc.parameters())
    assert disc.blocks[0][0].weight.grad.abs().sum() > 0 and disc.head.weight.grad.abs().sum() > 0
    # the check can fail: without the detach the discriminator's loss reaches the decoder
    disc.zero_grad(set_to_none=True)
    out = model(x)
    d_loss_fn(disc(x), disc(out.recon)).backward()
    assert decoder_last_layer(model).grad is not None


# -- differentiable augmentation ----------------------------------------------------------------

def test_shared_augmentation_applies_the_same_transform_to_real_and_fake():
    names = ("color", "translation", "cutout")
    real, fake = images(6, seed=1), images(6, seed=2)
    a_real, a_fake = augment_pair(real, fake, names, generator=torch.Generator().manual_seed(5))
    draw = draw_augment(names, 6, 16, 16, torch.device("cpu"), torch.Generator().manual_seed(5))
    assert torch.equal(a_real, apply_augment(real, draw)) and torch.equal(a_fake, apply_augment(fake, draw))
    same, same_too = augment_pair(real, real.clone(), names)
    assert torch.equal(same, same_too)
    other, other_too = augment_pair(real, real.clone(), names, shared=False)
    assert not torch.equal(other, other_too)
    assert augment_pair(real, fake, ()) == (real, fake)


def test_translation_and_cutout_move_and_blank_the_pixels_they_say():
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8) + 1
    shifted = apply_augment(x, AugmentDraw(shift=torch.tensor([[1, -1]])))
    assert torch.equal(shifted[0, :, 1:, :-1], x[0, :, :-1, 1:])  # one down, one left
    assert (shifted[0, :, 0] == 0).all() and (shifted[0, :, :, -1] == 0).all()  # zeros shift in
    cut = apply_augment(x, AugmentDraw(cutout=torch.tensor([[-2, 3]])))
    assert (cut[0, :, :2, 3:7] == 0).all()  # a 4x4 square from row -2: rows 0-1 of it inside
    assert (cut != 0).sum() == 2 * (64 - 8)


def test_augmentation_is_differentiable_in_float64():
    names = ("color", "translation", "cutout")
    x = images(2, c=3, side=8).double().requires_grad_(True)
    draw = draw_augment(names, 2, 8, 8, torch.device("cpu"), torch.Generator().manual_seed(3))
    assert torch.autograd.gradcheck(lambda t: apply_augment(t, draw), (x,))


def test_disc_augment_names_are_checked():
    assert parse_disc_augment("none") == () and parse_disc_augment("Color, cutout") == ("color", "cutout")
    with pytest.raises(VQGenError, match="unknown augmentation 'flip'"):
        parse_disc_augment("color,flip")
    with pytest.raises(VQGenError, match="names an augmentation twice"):
        parse_disc_augment("cutout,cutout")


# -- regularisers -------------------------------------------------------------------------------

def test_r1_is_the_squared_gradient_norm_of_the_score_at_real_images():
    """A 1x1 conv D: the score (mean of h*w patch logits) has gradient w / (h*w) at every pixel, so
    ||grad||^2 = h*w * ||w||^2 / (h*w)^2 = ||w||^2 / (h*w), whatever the image."""
    disc = nn.Conv2d(3, 1, 1)
    with torch.no_grad():
        disc.weight.copy_(torch.tensor([1.0, -2.0, 0.5]).reshape(1, 3, 1, 1))
    x = images(5, side=4)
    penalty = r1_penalty(disc, x)
    assert penalty.item() == pytest.approx((1 + 4 + 0.25) / 16)
    penalty.backward()  # and it trains the discriminator: d/dw (||w||^2 / 16) = w / 8
    assert torch.allclose(disc.weight.grad.flatten(), torch.tensor([1.0, -2.0, 0.5]) / 8)
    assert x.grad is None  # the real images are left alone


def test_lecam_averages_regularise_and_round_trip(tmp_path):
    lecam = LeCam(decay=0.9)
    assert lecam(torch.ones(3), torch.ones(3)).item() == pytest.approx(1.0)  # anchors 0 before any update
    lecam.update(torch.tensor([2.0, 4.0]), torch.tensor([-1.0, -3.0]))
    real_anchor, fake_anchor = lecam.anchors()
    assert (real_anchor.item(), fake_anchor.item()) == (pytest.approx(3.0), pytest.approx(-2.0))  # bias-corrected
    lecam.update(torch.tensor([1.0]), torch.tensor([0.0]))
    expected_real = (0.9 * 0.1 * 3 + 0.1 * 1) / (1 - 0.81)
    expected_fake = (0.9 * 0.1 * -2 + 0.1 * 0) / (1 - 0.81)
    assert lecam.anchors()[0].item() == pytest.approx(expected_real)
    real, fake = torch.tensor([3.0, -5.0]), torch.tensor([0.0, 4.0])
    value = lecam(real, fake).item()
    assert value == pytest.approx((max(0, 3 - expected_fake) ** 2 + 0) / 2 + (max(0, expected_real) ** 2 + 0) / 2)
    save_file(lecam.state_dict(), tmp_path / "lecam.safetensors")
    restored = LeCam(decay=0.9)
    restored.load_state_dict(load_file(tmp_path / "lecam.safetensors"))
    assert restored(real, fake).item() == value and int(restored.updates) == 2
    mean_of_two = lambda t: (t + torch.tensor([1.0, 1.0])) / 2  # what a mean over two processes does
    lecam.update(torch.tensor([1.0]), torch.tensor([1.0]), reduce=mean_of_two)
    restored.update(torch.tensor([1.0]), torch.tensor([1.0]))
    assert torch.allclose(torch.stack(lecam.anchors()), torch.stack(restored.anchors()))


# -- perceptual terms ---------------------------------------------------------------------------

@pytest.mark.parametrize("measure", [ssim, ms_ssim])
def test_ssim_is_one_for_the_same_image_and_falls_with_noise(measure):
    x = F.avg_pool2d(images(3, side=64), 3, stride=1, padding=1)  # some structure to lose
    assert torch.allclose(measure(x, x), torch.ones(3), atol=1e-5)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    scores = [measure((x + s * noise).clamp(-1, 1), x).mean().item() for s in (0.05, 0.2, 0.5)]
    assert 1 > scores[0] > scores[1] > scores[2]
    y = (x + 0.1 * noise).requires_grad_(True)
    measure(y, x).sum().backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_ssim_matches_scikit_image():
    """Wang et al.'s Gaussian SSIM as scikit-image computes it (valid region, population covariances)."""
    metrics = pytest.importorskip("skimage.metrics")
    x = F.avg_pool2d(images(2, side=32, seed=4), 3, stride=1, padding=1).double()
    y = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)).clamp(-1, 1)
    ours = ssim(x, y)
    for i in range(2):
        theirs = metrics.structural_similarity(x[i].numpy(), y[i].numpy(), data_range=2.0, channel_axis=0,
                                               gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert ours[i].item() == pytest.approx(theirs, abs=1e-6)


def test_ms_ssim_uses_the_scales_that_fit():
    assert [ms_ssim_scales(s, s) for s in (16, 32, 64, 176, 256)] == [1, 2, 3, 5, 5]
    x = images(2, side=8)  # smaller than the window: a 7-px one
    assert torch.allclose(ms_ssim(x, x), torch.ones(2), atol=1e-5)
    with pytest.raises(VQGenError, match="one shape"):
        ssim(x, x[:, :1])


def pretend_lpips(monkeypatch, spec):
    """importlib.util.find_spec answers `spec` for "lpips" and the truth for every other package."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: spec if name == "lpips" else real_find_spec(name, *a))


def test_lpips_is_refused_in_one_line_when_the_package_is_missing(monkeypatch):
    pretend_lpips(monkeypatch, None)
    with pytest.raises(VQGenError) as err:
        perceptual_loss("lpips")
    assert "pip install lpips" in str(err.value) and "network" in str(err.value) and "\n" not in str(err.value)


def test_lpips_is_refused_in_one_line_when_its_weights_do_not_load(monkeypatch):
    def no_network(**_):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>\nmore lines")

    fake = types.ModuleType("lpips")
    fake.LPIPS = no_network
    monkeypatch.setitem(sys.modules, "lpips", fake)
    pretend_lpips(monkeypatch, object())
    with pytest.raises(VQGenError) as err:
        perceptual_loss("lpips")
    reason = "<urlopen error [Errno -3] Temporary failure in name resolution>"
    assert str(err.value) == f"LPIPS could not be loaded ({reason}): {LPIPS_HELP}"


def test_feature_matching_moves_only_the_fakes():
    disc = tiny_discriminator()
    real, fake = images(seed=1), images(seed=2).requires_grad_(True)
    real.requires_grad_(True)
    loss_fn = perceptual_loss("feature_matching", features=disc.features)
    assert list(loss_fn.parameters()) == []  # the discriminator's weights stay its own
    assert loss_fn(real.detach(), real.detach()).item() == 0.0
    with frozen(disc):
        loss_fn(fake, real).backward()
    assert fake.grad.abs().sum() > 0 and real.grad is None
    assert all(p.grad is None for p in disc.parameters())
    with pytest.raises(VQGenError, match="at least|>= 2"):
        feature_matching_loss([fake], [real])


def test_perceptual_kinds_share_one_interface():
    x, y = images(seed=1), images(seed=2)
    for kind in ("ssim", "ms_ssim"):
        loss_fn = perceptual_loss(kind)
        assert loss_fn(x, x).item() == pytest.approx(0.0, abs=1e-5) and loss_fn(x, y).item() > 0
    with pytest.raises(VQGenError, match="perceptual must be one of lpips, ssim, ms_ssim, feature_matching, "
                                         "own_features, got 'vgg'"):
        perceptual_loss("vgg")
    with pytest.raises(VQGenError, match="needs the discriminator's features"):
        perceptual_loss("feature_matching")


# -- options ------------------------------------------------------------------------------------

def test_gan_options_are_validated_in_one_line_naming_the_value():
    assert not GANConfig().adversarial  # off by default
    cfg = GANConfig(adversarial_weight=0.8, disc_width=8, disc_augment="translation")
    assert cfg.augment_names == ("translation",)
    assert cfg.discriminator_config(1, 28, 28).num_layers == 1
    cases = [
        (dict(adversarial_weight=-0.1), "adversarial_weight must be a finite number >= 0, got -0.1"),
        (dict(perceptual_weight=float("nan")), "perceptual_weight must be a finite number >= 0, got nan"),
        (dict(adversarial_weight=1, lecam_weight=-1), "lecam_weight must be a finite number >= 0, got -1"),
        (dict(adversarial_start=-5), "adversarial_start must be >= 0, got -5"),
        (dict(adversarial_loss="wasserstein"),
         "adversarial_loss must be one of hinge, non_saturating, got 'wasserstein'"),
        (dict(perceptual="vgg"),
         "perceptual must be one of lpips, ssim, ms_ssim, feature_matching, own_features, got 'vgg'"),
        (dict(disc_norm="batch"), "disc_norm must be one of group, spectral, none, got 'batch'"),
        (dict(disc_width=0), "disc_width must be >= 1, got 0"),
        (dict(disc_layers=-1), "disc_layers must be >= 0"),
        (dict(disc_augment="color,flip"), "unknown augmentation 'flip'"),
        (dict(adversarial_weight=1, lecam_decay=1.0), "lecam_decay must be in \\(0, 1\\), got 1.0"),
        (dict(r1_weight=10.0), "r1_weight 10.0 needs the discriminator, which adversarial_weight 0 turns off"),
        (dict(perceptual="feature_matching", perceptual_weight=1.0),
         "perceptual feature_matching needs the discriminator"),
    ]
    for kw, message in cases:
        with pytest.raises(VQGenError, match=message) as err:
            GANConfig(**kw)
        assert "\n" not in str(err.value), kw


def test_every_gan_option_carries_its_help():
    import dataclasses

    missing = [f"{cls.__name__}.{f.name}" for cls in (GANConfig, DiscriminatorConfig)
               for f in dataclasses.fields(cls) if len(f.metadata.get("help", "").split()) < 2]
    assert missing == []


# -- in the training loop -----------------------------------------------------------------------

GAN_ON = dict(adversarial_weight=0.5, disc_width=8, lecam_weight=0.1, r1_weight=1.0, perceptual="ms_ssim",
              perceptual_weight=0.2)


def train_records(run, split="train"):
    import json

    lines = (run / "vqvae" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def test_resume_with_the_discriminator_continues_exactly(tmp_path):
    """2 steps + save + resume + 2 steps equals 4 straight steps: both models, both optimizers, LeCam's averages."""
    from conftest import TINY_DATA, TINY_VQVAE, tiny_train
    from stage1_vqvae.train import train_vqvae

    straight, split = tmp_path / "straight", tmp_path / "split"
    train_vqvae(straight, TINY_DATA, tiny_train(max_steps=4, save_every=2), TINY_VQVAE, encode=False, gan=GAN_ON)
    train_vqvae(split, TINY_DATA, tiny_train(max_steps=2, save_every=2), TINY_VQVAE, encode=False, gan=GAN_ON)
    train_vqvae(split, TINY_DATA, tiny_train(max_steps=4, save_every=2), resume=True, encode=False)
    for name in ("model.safetensors", "state/step-00000004/model.safetensors",
                 "state/step-00000004/model_1.safetensors"):
        a, b = load_file(straight / "vqvae" / name), load_file(split / "vqvae" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    critic = load_file(straight / "vqvae/state/step-00000004/model_1.safetensors")
    assert int(critic["lecam.updates"]) == 4 and "disc.head.weight" in critic
    opt_a, opt_b = (torch.load(run / "vqvae/state/step-00000004/optimizer_1.bin", weights_only=True)
                    for run in (straight, split))
    assert opt_a["param_groups"][0]["betas"] == [0.5, 0.9] or tuple(opt_a["param_groups"][0]["betas"]) == (0.5, 0.9)
    for key, value in opt_a["state"].items():
        assert torch.equal(value["exp_avg_sq"], opt_b["state"][key]["exp_avg_sq"])
        assert int(value["step"]) == int(opt_b["state"][key]["step"]) == 4
    keys = ("loss", "d_loss", "d_real_acc", "adaptive_weight", "g_adv", "lecam", "r1", "perceptual")
    rows = lambda run: [(r["step"], *(r[k] for k in keys)) for r in train_records(run)]
    assert rows(split)[2:] == rows(straight)[2:]  # steps 3 and 4 to the last bit
    assert (split / "vqvae" / "gan_config.json").is_file()


def test_the_adversarial_start_step_is_honoured(tmp_path):
    """Before the start: no discriminator step, no adversarial term; from it on: both, logged."""
    from conftest import TINY_DATA, TINY_VQVAE, tiny_train
    from stage1_vqvae.train import train_vqvae

    run = tmp_path / "run"
    train_vqvae(run, TINY_DATA, tiny_train(max_steps=4, save_every=1, keep=4), TINY_VQVAE, encode=False,
                gan=dict(adversarial_weight=0.5, adversarial_start=2, disc_width=8))
    records = train_records(run)
    assert ["d_loss" in r and "g_adv" in r for r in records] == [False, False, True, True]
    assert all(0 <= records[-1][k] <= 1 for k in ("d_real_acc", "d_fake_acc")) and records[-1]["adaptive_weight"] > 0
    critic = lambda step: load_file(run / f"vqvae/state/step-{step:08d}/model_1.safetensors")
    unchanged = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)
    assert unchanged(critic(1), critic(2)) and not unchanged(critic(2), critic(3))
    assert torch.load(run / "vqvae/state/step-00000002/optimizer_1.bin", weights_only=True)["state"] == {}


def test_gan_off_writes_no_gan_files_and_cannot_be_switched_on_at_resume(tmp_path):
    from conftest import TINY_DATA, TINY_VQVAE, tiny_train
    from stage1_vqvae.train import train_vqvae

    run = tmp_path / "run"
    train_vqvae(run, TINY_DATA, tiny_train(max_steps=2, save_every=2), TINY_VQVAE, encode=False)
    assert not (run / "vqvae" / "gan_config.json").exists()
    assert not (run / "vqvae/state/step-00000002/model_1.safetensors").exists()
    assert "d_loss" not in train_records(run)[-1]
    with pytest.raises(VQGenError, match="trained without adversarial or perceptual terms"):
        train_vqvae(run, TINY_DATA, tiny_train(max_steps=4), resume=True, encode=False,
                    gan=dict(adversarial_weight=0.5))


def test_adversarial_steps_do_not_wait_for_the_device(tmp_path):
    """As tests/test_structure.py checks for plain training: 5 steps with the discriminator sync as often as 3."""
    from test_structure import SyncCounter

    from conftest import TINY_DATA, TINY_VQVAE, tiny_train
    from stage1_vqvae.train import train_vqvae

    def syncs(steps):
        counter = SyncCounter()
        with counter:
            train_vqvae(tmp_path / f"run{steps}", TINY_DATA,
                        tiny_train(max_steps=steps, log_every=1000, eval_every=0, save_every=0),
                        TINY_VQVAE, encode=False, gan=GAN_ON)
        return counter.calls

    few, many = syncs(3), syncs(5)
    assert few == many, f"per-step syncs: {many - few}"


def test_bf16_mixed_precision_trains_the_discriminator(tmp_path):
    from conftest import TINY_DATA, TINY_VQVAE, tiny_train
    from stage1_vqvae.train import train_vqvae

    run = tmp_path / "run"
    train_vqvae(run, TINY_DATA, tiny_train(max_steps=3, mixed_precision="bf16"), TINY_VQVAE, encode=False,
                gan=GAN_ON)
    last = train_records(run)[-1]
    assert all(math.isfinite(last[k]) for k in ("loss", "d_loss", "adaptive_weight", "lecam", "r1", "perceptual"))


@pytest.mark.slow
def test_two_processes_keep_one_discriminator(spawn, tmp_path):
    """DDP on 2 CPU processes (gloo): the adaptive weight's autograd.grad, R1's double backward and LeCam's
    averages work across processes and leave both copies of the discriminator identical."""
    from conftest import stage1_in_two_processes

    run, (a, b) = stage1_in_two_processes(spawn, tmp_path, GAN_ON, "critic")
    assert int(a["lecam.updates"]) == 4
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(math.isfinite(train_records(run)[-1][k]) for k in ("d_loss", "adaptive_weight", "lecam", "r1"))


def test_before_the_start_the_autoencoder_trains_exactly_as_without_the_discriminator(tmp_path):
    """The discriminator draws its initial weights from an RNG of its own and nothing runs before the start:
    the autoencoder's weights and losses are those of a plain run, to the last bit."""
    from conftest import TINY_DATA, TINY_VQVAE, tiny_train
    from stage1_vqvae.train import train_vqvae

    plain, gan = tmp_path / "plain", tmp_path / "gan"
    train_vqvae(plain, TINY_DATA, tiny_train(max_steps=4, save_every=3), TINY_VQVAE, encode=False)
    train_vqvae(gan, TINY_DATA, tiny_train(max_steps=4, save_every=3), TINY_VQVAE, encode=False,
                gan=dict(adversarial_weight=0.5, adversarial_start=3, disc_width=8))
    a, b = (load_file(run / "vqvae/state/step-00000003/model.safetensors") for run in (plain, gan))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in train_records(plain)][:3] == [r["loss"] for r in train_records(gan)][:3]
    assert "g_adv" not in train_records(gan)[2] and "g_adv" in train_records(gan)[3]


def test_a_start_step_at_or_beyond_the_last_step_is_refused_before_anything_is_written(tmp_path):
    from conftest import TINY_DATA, TINY_VQVAE, tiny_train
    from stage1_vqvae.train import train_vqvae

    run = tmp_path / "run"
    with pytest.raises(VQGenError, match="adversarial_start 100 is not before max_steps 3: the discriminator "
                                         "would never train") as err:
        train_vqvae(run, TINY_DATA, tiny_train(max_steps=3), TINY_VQVAE, encode=False,
                    gan=dict(adversarial_weight=0.5, adversarial_start=100))
    assert "\n" not in str(err.value) and not (run / "vqvae" / "config.json").exists()


@pytest.mark.parametrize("variant", [
    dict(disc_norm="spectral", adversarial_loss="non_saturating", r1_weight=0.5, disc_augment_shared=False),
    dict(disc_norm="none", adaptive_weight=False, disc_augment="none", disc_learning_rate=1e-4,
         perceptual="feature_matching", perceptual_weight=1.0),
])
def test_every_variant_trains(tmp_path, variant):
    from conftest import TINY_DATA, TINY_VQVAE, tiny_train
    from stage1_vqvae.train import train_vqvae

    run = tmp_path / "run"
    train_vqvae(run, TINY_DATA, tiny_train(max_steps=2, save_every=2), TINY_VQVAE, encode=False,
                gan=dict(adversarial_weight=0.5, disc_width=8, **variant))
    last = train_records(run)[-1]
    assert math.isfinite(last["d_loss"]) and math.isfinite(last["g_adv"])
    if not variant.get("adaptive_weight", True):
        assert last["adaptive_weight"] == 0.5
    if "disc_learning_rate" in variant:
        opt = torch.load(run / "vqvae/state/step-00000002/optimizer_1.bin", weights_only=True)
        assert opt["param_groups"][0]["lr"] == pytest.approx(1e-4)  # the schedule (constant 3e-3) x its ratio


def test_a_refused_lpips_writes_nothing(tmp_path, monkeypatch):
    from conftest import TINY_DATA, TINY_VQVAE, tiny_train
    from stage1_vqvae.train import train_vqvae

    pretend_lpips(monkeypatch, None)
    run = tmp_path / "run"
    with pytest.raises(VQGenError, match="pip install lpips"):
        train_vqvae(run, TINY_DATA, tiny_train(max_steps=2), TINY_VQVAE, encode=False,
                    gan=dict(perceptual="lpips", perceptual_weight=1.0))
    assert not (run / "vqvae" / "config.json").exists() and not (run / "vqvae" / "gan_config.json").exists()
