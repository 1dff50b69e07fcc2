"""The priors benchmark's code-by-code scores (scripts/benchmarks/priors.py, `context_bits`)."""

import itertools
import math

import torch
import torch.nn.functional as F

from conftest import load_script
from stage2_prior.config import MaskedConfig, TransformerConfig
from stage2_prior.masked import MaskedPrior
from stage2_prior.transformer import TransformerPrior
from vqgen.run import Run

priors = load_script("benchmarks/priors")
SMALL = dict(codebook_size=3, grid_height=2, grid_width=2, num_classes=2, d_model=16, n_layers=1, n_heads=2)


def test_one_hidden_code_of_a_raster_prior_is_its_conditional_under_the_whole_joint(monkeypatch):
    # 3 codes, 4 places: the joint over all 81 grids, enumerated, then conditioned on the other three codes;
    # the candidates scored two at a time, so the 3 come in two chunks
    monkeypatch.setattr(priors, "CANDIDATES", 2)
    torch.manual_seed(0)
    prior = TransformerPrior(TransformerConfig(**SMALL)).eval()
    every = torch.tensor(list(itertools.product(range(3), repeat=4))).view(81, 2, 2)
    labels = torch.tensor([1, 0])
    grids = every[torch.tensor([5, 70])]
    positions = torch.tensor([1, 2])
    expected = 0.0
    for grid, label, pos in zip(grids, labels, positions.tolist()):
        with torch.no_grad():
            logp = F.log_softmax(prior(every, label.expand(81)), -1).gather(-1, every[..., None]).flatten(1).sum(1)
        rest = [i for i in range(4) if i != pos]
        same = (every.flatten(1)[:, rest] == grid.flatten()[rest]).all(1)  # the 3 grids that differ only at pos
        match = same & (every.flatten(1)[:, pos] == grid.flatten()[pos])
        expected -= (logp[match].logsumexp(0) - logp[same].logsumexp(0)).item()
    got = priors.raster_one_hidden_bits(prior, grids, labels, positions)
    assert math.isclose(got, expected / 2 / math.log(2), rel_tol=1e-4)


def test_the_last_code_with_every_other_in_view_is_what_the_raster_prior_predicts_for_it_anyway():
    # nothing follows the last raster position, so Bayes over the joint gives the prior's own next-code distribution
    torch.manual_seed(1)
    prior = TransformerPrior(TransformerConfig(**(SMALL | dict(codebook_size=7, grid_height=3, grid_width=3)))).eval()
    grids = torch.randint(7, (4, 3, 3))
    with torch.no_grad():
        own = F.cross_entropy(prior(grids, None)[:, 2, 2], grids[:, 2, 2]).item() / math.log(2)
    got = priors.raster_one_hidden_bits(prior, grids, None, torch.full((4,), 8))
    assert math.isclose(got, own, rel_tol=1e-4)


def test_a_masked_prior_is_scored_on_its_hidden_codes_only_and_every_variant_at_the_same_places():
    torch.manual_seed(2)
    prior = MaskedPrior(MaskedConfig(**SMALL)).eval()
    grids = torch.randint(3, (5, 2, 2))
    mask = torch.zeros(5, 2, 2, dtype=torch.bool)
    mask[:, 0, 1] = True
    with torch.no_grad():
        logits = prior(grids, None, mask)
    expected = F.cross_entropy(logits[:, 0, 1], grids[:, 0, 1]).item() / math.log(2)
    assert math.isclose(priors.masked_bits(prior, grids, None, mask), expected, rel_tol=1e-5)
    changed = grids.clone()
    changed[:, 0, 1] = (changed[:, 0, 1] + 1) % 3  # the hidden codes' values are never read
    with torch.no_grad():
        assert torch.equal(prior(changed, None, mask), logits)
    first = priors.one_hidden_positions(50, 64, seed=3)
    assert torch.equal(first, priors.one_hidden_positions(50, 64, seed=3))
    assert 0 <= int(first.min()) and int(first.max()) < 64 and len(set(first.tolist())) > 10


def test_context_bits_of_both_kinds_of_prior_score_the_same_test_codes_at_the_same_places(tiny_run, tiny_masked_run):
    raster = priors.context_bits(Run.load(tiny_run), grids=3, seed=0)
    masked = priors.context_bits(Run.load(tiny_masked_run), grids=3, seed=0)
    assert raster["grids"] == masked["grids"] == 3
    assert set(raster) == {"grids", "one_hidden", "raster_order"}
    assert set(masked) == {"grids", "one_hidden", "hidden_share"}
    assert list(masked["hidden_share"]) == ["0.1", "0.25", "0.5", "0.75", "0.9", "1"]
    k = Run.load(tiny_run).need_prior().config.codebook_size
    for value in [raster["one_hidden"], raster["raster_order"], masked["one_hidden"], *masked["hidden_share"].values()]:
        assert 0 < value < 3 * math.log2(k)  # finite bits, of the order of log2 K for barely trained priors
    assert priors.context_bits(Run.load(tiny_masked_run), grids=3, seed=0) == masked  # a function of the seed
