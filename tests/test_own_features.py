"""The perceptual term that needs no download: features of a network trained on the run's own images
(`--perceptual own_features`). Tiny nets on the CPU."""

import json

import pytest
import torch
from safetensors.torch import load_file

from stage1_vqvae import perceptual
from stage1_vqvae.perceptual import OWN_FEATURES_SEED, own_feature_net, own_features_distance, perceptual_loss
from vqgen.core.evaluate.quality import Judge, JudgeConfig
from vqgen.core.runtime.errors import VQGenError

OWN = dict(perceptual="own_features", perceptual_weight=1.0)


def tiny_net(c=3, side=16):
    torch.manual_seed(0)
    return Judge(JudgeConfig(in_channels=c, image_height=side, image_width=side, width=4)).eval()


def images(seed, n=4, side=16):
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_the_distance_is_zero_for_the_same_image_and_moves_only_the_fakes():
    net = tiny_net()
    loss_fn = perceptual_loss("own_features", net=net)
    real, fake = images(1).requires_grad_(True), images(2).requires_grad_(True)
    assert loss_fn(real.detach(), real.detach()).item() == 0.0
    loss = loss_fn(fake, real)
    assert loss.item() > 0
    loss.backward()
    assert fake.grad.abs().sum() > 0 and real.grad is None
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())  # frozen: a loss, not a model
    loss_fn.train()
    assert not net.training


def test_the_distance_averages_the_stages_of_unit_normalised_features():
    """The term is the mean over the net's four stages of the squared distance between feature vectors scaled to
    unit length at each position (LPIPS's channel normalisation), summed over channels."""
    net = tiny_net()
    fake, real = images(3), images(4)
    def unit(x):
        return x / (x.norm(dim=1, keepdim=True) + 1e-8)

    expected, f, r = [], fake, real
    for stage in net.body:
        f, r = stage(f), stage(r)
        expected.append((unit(f) - unit(r)).pow(2).sum(dim=1).mean())
    assert len(expected) == 4
    assert own_features_distance(net, fake, real).item() == pytest.approx(torch.stack(expected).mean().item(),
                                                                          rel=1e-5)


def test_without_its_network_the_term_is_refused_in_one_line():
    with pytest.raises(VQGenError, match="own_features needs the network trained on the run's images") as err:
        perceptual_loss("own_features")
    assert "\n" not in str(err.value)


def test_the_network_learns_rotations_from_a_seed_that_is_not_the_judges(tmp_path):
    """The run's judge (seed 0) learns the labels; the perceptual network learns rotations from another seed,
    so a run does not train towards the features it is scored in."""
    from conftest import TINY_DATA
    from vqgen.core.data.images import load_image_data
    from vqgen.core.evaluate.quality import run_judge
    from vqgen.core.store.layout import RunLayout

    data = load_image_data(TINY_DATA)
    net, loaded = own_feature_net(RunLayout(tmp_path).vqvae.perceptual_net, data, "cpu", load=True)
    assert not loaded  # nothing saved there: trained
    assert (net.config.task, net.config.seed) == ("rotation", OWN_FEATURES_SEED) and OWN_FEATURES_SEED != 0
    judge = run_judge(RunLayout(tmp_path).judge, data)
    assert (judge.config.task, judge.config.seed) == ("labels", 0)
    again, _ = own_feature_net(RunLayout(tmp_path).vqvae.perceptual_net, data, "cpu", load=False)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))


def train_records(run):
    lines = (run / "vqvae" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def test_a_run_saves_its_network_and_resumes_exactly_with_it(tmp_path, monkeypatch):
    """2 steps + resume + 2 steps equals 4 straight steps; the resumed run loads the saved network, never
    training it again."""
    from conftest import TINY_DATA, TINY_VQVAE, tiny_train
    from stage1_vqvae.train import train_vqvae

    straight, split = tmp_path / "straight", tmp_path / "split"
    train_vqvae(straight, TINY_DATA, tiny_train(max_steps=4, save_every=2), TINY_VQVAE, encode=False, gan=OWN)
    train_vqvae(split, TINY_DATA, tiny_train(max_steps=2, save_every=2), TINY_VQVAE, encode=False, gan=OWN)
    net = split / "vqvae" / "perceptual_net"
    saved = load_file(net / "model.safetensors")
    assert json.loads((net / "config.json").read_text())["seed"] == OWN_FEATURES_SEED

    def no_training(*args, **kwargs):
        raise AssertionError("a resumed run trains its perceptual network again")

    monkeypatch.setattr(perceptual, "train_judge", no_training)
    train_vqvae(split, TINY_DATA, tiny_train(max_steps=4, save_every=2), resume=True, encode=False)
    a, b = (load_file(run / "vqvae" / "model.safetensors") for run in (straight, split))
    assert all(torch.equal(a[k], b[k]) for k in a)
    def rows(run):
        return [(r["step"], r["loss"], r["perceptual"]) for r in train_records(run)]

    assert rows(split)[2:] == rows(straight)[2:] and rows(straight)[-1][2] > 0
    assert all(torch.equal(saved[k], v) for k, v in load_file(net / "model.safetensors").items())


def test_a_refused_option_is_refused_before_the_network_trains(tmp_path, monkeypatch):
    from conftest import TINY_DATA, TINY_VQVAE, tiny_train
    from stage1_vqvae.train import train_vqvae

    def no_training(*args, **kwargs):
        raise AssertionError("the perceptual network trained before the options were checked")

    monkeypatch.setattr(perceptual, "train_judge", no_training)
    run = tmp_path / "run"
    with pytest.raises(VQGenError, match="adversarial_start 100 is not before max_steps 3") as err:
        train_vqvae(run, TINY_DATA, tiny_train(max_steps=3), TINY_VQVAE, encode=False,
                    gan=dict(OWN, adversarial_weight=0.5, adversarial_start=100))
    assert "\n" not in str(err.value) and not (run / "vqvae").exists()


@pytest.mark.slow
def test_two_processes_use_the_main_processs_network(spawn, tmp_path):
    """Under 2 CPU processes (gloo) the hand-over of the main process's network runs and every process compares
    features in the network the main process saved. (On the CPU each process's own training would give the same
    weights; the hand-over is for CUDA, which this cannot show.)"""
    from conftest import stage1_in_two_processes

    run, nets = stage1_in_two_processes(spawn, tmp_path, OWN, "perceptual.net")
    saved = load_file(run / "vqvae" / "perceptual_net" / "model.safetensors")
    for net in nets:
        assert net.keys() == saved.keys() and all(torch.equal(net[k], saved[k]) for k in saved)
