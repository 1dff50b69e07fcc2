"""sample_codes and filter_logits: per-sample seeding, greedy, guidance, prefixes, argument checks."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from stage2_prior.config import PixelCNNConfig, SamplingConfig, TransformerConfig
from stage2_prior.pixelcnn import PixelCNNPrior
from stage2_prior.sampling import filter_logits, guidance_scales, inverse_cdf, sample_codes
from stage2_prior.transformer import TransformerPrior
from vqgen.core.runtime.errors import VQGenError
from vqgen.sweep import parse_sweep

KINDS = ["transformer", "pixelcnn"]


def make_prior(kind: str, **fields) -> torch.nn.Module:
    """A tiny conditional prior (K=8, 3x3 grid, 3 classes) with weights scaled up for peaky logits."""
    shared = dict(codebook_size=8, grid_height=3, grid_width=3, num_classes=3) | fields
    torch.manual_seed(0)
    if kind == "transformer":
        prior = TransformerPrior(TransformerConfig(d_model=32, n_layers=2, n_heads=2, **shared))
    else:
        prior = PixelCNNPrior(PixelCNNConfig(channels=16, n_layers=3, **shared))
    with torch.no_grad():
        for p in prior.parameters():
            p.mul_(3.0 if kind == "transformer" else 1.5)
    return prior.eval()


@pytest.fixture(params=KINDS)
def prior(request) -> torch.nn.Module:
    return make_prior(request.param)


def full_logits(prior, codes: torch.Tensor, labels, pos: int) -> torch.Tensor:
    """(n, t) codes -> (n, k) logits at `pos` from a full teacher-forced forward pass."""
    grid = rearrange(codes, "n (h w) -> n h w", w=prior.config.grid_width)
    return rearrange(prior(grid, labels), "n h w k -> n (h w) k")[:, pos]


def reference_sample(prior, n, labels=None, seeds=None, temperature=1.0, cfg_scale=1.0, prefix=None, prefix_len=0,
                     greedy=False, scale_at=None):
    """The sampling contract spelled out slowly: full forward per position, uniforms from Generator(seed);
    `scale_at(pos)`, when given, is the guidance scale at each position instead of cfg_scale."""
    t, k = prior.config.seq_len, prior.config.codebook_size
    seeds = torch.arange(n) if seeds is None else seeds
    uniforms = torch.stack([torch.rand(t, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    codes = torch.zeros(n, t, dtype=torch.long)
    if prefix is not None:
        codes[:] = rearrange(prefix, "n h w -> n (h w)")
    with torch.no_grad():
        for pos in range(prefix_len, t):
            logits = full_logits(prior, codes, labels, pos)
            if cfg_scale != 1.0:
                uncond = full_logits(prior, codes, None, pos)
                logits = uncond + (scale_at(pos) if scale_at else cfg_scale) * (logits - uncond)
            if greedy:
                codes[:, pos] = logits.argmax(-1)
                continue
            cdf = F.softmax(logits / temperature, dim=-1).cumsum(-1)
            below = cdf <= uniforms[:, pos : pos + 1] * cdf[:, -1:]
            codes[:, pos] = below.sum(-1).clamp_max(k - 1)
    return rearrange(codes, "n (h w) -> n h w", w=prior.config.grid_width)


def test_matches_the_slow_reference(prior):
    labels = torch.tensor([0, 1, 2, 3, 1])  # 3 = null class
    seeds = torch.tensor([7, 8, 9, 10, 11])
    got = sample_codes(prior, 5, labels=labels, seeds=seeds, temperature=0.8)
    assert torch.equal(got, reference_sample(prior, 5, labels, seeds, temperature=0.8))


def test_same_seeds_same_samples_different_seeds_differ(prior):
    seeds = torch.arange(6) + 40
    first = sample_codes(prior, 6, seeds=seeds, top_p=0.95)
    assert torch.equal(first, sample_codes(prior, 6, seeds=seeds, top_p=0.95))
    other = sample_codes(prior, 6, seeds=seeds + 1000, top_p=0.95)
    assert bool((first != other).flatten(1).any(1).all())


def test_sample_depends_only_on_its_seed(prior):
    labels, seeds = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([10, 11, 12, 13, 14])
    kwargs = dict(temperature=1.2, top_k=6, top_p=0.9, cfg_scale=2.0)
    whole = sample_codes(prior, 5, labels=labels, seeds=seeds, **kwargs)
    for batch_size in (1, 2):
        chunked = sample_codes(prior, 5, labels=labels, seeds=seeds, batch_size=batch_size, **kwargs)
        assert torch.equal(whole, chunked)
    neighbours = sample_codes(prior, 3, labels=torch.tensor([1, 2, 0]), seeds=torch.tensor([99, 12, 98]), **kwargs)
    assert torch.equal(neighbours[1], whole[2])


def test_top_k_one_is_greedy_and_keeps_the_prefix(prior):
    gen = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, 8, (4, 3, 3), generator=gen)
    labels = torch.tensor([0, 1, 2, 0])
    got = sample_codes(prior, 4, labels=labels, top_k=1, temperature=0.3, prefix=prefix, prefix_len=4)
    assert torch.equal(got.flatten(1)[:, :4], prefix.flatten(1)[:, :4])
    assert torch.equal(got, reference_sample(prior, 4, labels, prefix=prefix, prefix_len=4, greedy=True))


def test_top_k_one_breaks_ties_like_argmax():
    prior = make_prior("transformer", num_classes=0)
    with torch.no_grad():
        prior.head.weight.zero_()  # every logit 0: all codes tie
    assert torch.equal(sample_codes(prior, 3, top_k=1), torch.zeros(3, 3, 3, dtype=torch.long))


def test_prefix_is_kept(prior):
    prefix = torch.randint(0, 8, (3, 3, 3), generator=torch.Generator().manual_seed(5))
    got = sample_codes(prior, 3, prefix=prefix, prefix_len=5, seeds=torch.tensor([1, 2, 3]))
    assert torch.equal(got.flatten(1)[:, :5], prefix.flatten(1)[:, :5])
    assert torch.equal(got, reference_sample(prior, 3, seeds=torch.tensor([1, 2, 3]), prefix=prefix, prefix_len=5))
    assert torch.equal(sample_codes(prior, 3, prefix=prefix, prefix_len=9), prefix)


def test_classifier_free_guidance(prior, monkeypatch):
    labels = torch.tensor([0, 1, 2, 2])
    plain = sample_codes(prior, 4, labels=labels)
    started: list[int] = []
    start = prior.start
    monkeypatch.setattr(prior, "start", lambda lab, b: started.append(b) or start(lab, b))
    assert torch.equal(sample_codes(prior, 4, labels=labels, cfg_scale=1.0), plain)
    sample_codes(prior, 4, labels=labels, cfg_scale=2.0)
    assert started == [4, 8], "cfg_scale=1 must take the plain path, other scales one doubled batch"
    monkeypatch.undo()
    guided = sample_codes(prior, 4, labels=labels, cfg_scale=3.0)
    assert torch.equal(guided, reference_sample(prior, 4, labels, cfg_scale=3.0))
    assert not torch.equal(guided, plain)
    assert torch.equal(sample_codes(prior, 4, labels=labels, cfg_scale=0.0), sample_codes(prior, 4))  # all null


def test_guidance_schedule_rises_linearly_from_one_to_the_scale():
    assert guidance_scales(4.0, "constant", 3) == [4.0, 4.0, 4.0]
    assert guidance_scales(4.0, "linear", 4) == [1.0, 2.0, 3.0, 4.0]  # 1 at the first draw, the scale at the last
    assert guidance_scales(4.0, "linear", 1) == [4.0]  # one draw (one step of a masked prior): the scale itself
    assert guidance_scales(0.0, "linear", 3) == [1.0, 0.5, 0.0]


def test_linear_guidance_schedule_guides_each_position_by_its_own_scale(prior):
    labels, seeds = torch.tensor([0, 1, 2, 2]), torch.tensor([3, 4, 5, 6])
    t = prior.config.seq_len
    ramped = sample_codes(prior, 4, labels=labels, seeds=seeds, cfg_scale=5.0, cfg_schedule="linear")
    expected = reference_sample(prior, 4, labels, seeds, cfg_scale=5.0, scale_at=lambda pos: 1 + 4 * pos / (t - 1))
    assert torch.equal(ramped, expected)
    assert not torch.equal(ramped, sample_codes(prior, 4, labels=labels, seeds=seeds, cfg_scale=5.0))
    # sample i still depends only on (seed i, label i): drawn alone it comes out the same
    assert torch.equal(sample_codes(prior, 1, labels=labels[2:3], seeds=seeds[2:3], cfg_scale=5.0,
                                    cfg_schedule="linear"), ramped[2:3])
    with pytest.raises(VQGenError, match="cfg_schedule must be one of constant, linear, got 'cosine'"):
        sample_codes(prior, 2, labels=labels[:2], cfg_scale=2.0, cfg_schedule="cosine")
    settings = parse_sweep(["cfg-schedule=constant,linear", "cfg=1.5,8"], SamplingConfig())
    assert [(s.cfg_schedule, s.cfg_scale) for s in settings] == [("constant", 1.5), ("constant", 8.0),
                                                                 ("linear", 1.5), ("linear", 8.0)]
    with pytest.raises(VQGenError, match="cfg_schedule must be one of constant, linear, got 'cosine'"):
        parse_sweep(["cfg-schedule=cosine"], SamplingConfig())


def test_sampling_under_bf16_autocast(prior):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = sample_codes(prior, 3, labels=torch.tensor([0, 1, 2]), cfg_scale=2.0, top_p=0.9)
    assert codes.shape == (3, 3, 3) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < 8


@pytest.mark.parametrize("kind", KINDS)
def test_frequencies_follow_the_filtered_distribution(kind):
    prior = make_prior(kind, grid_height=1, grid_width=1, codebook_size=4, num_classes=0)
    with torch.no_grad():
        logits = full_logits(prior, torch.zeros(1, 1, dtype=torch.long), None, 0)[0] / 0.7
    probs = F.softmax(logits, dim=-1)
    assert probs.max() - probs.min() > 0.1, "the test needs a non-uniform distribution"
    codes = sample_codes(prior, 4000, temperature=0.7).flatten()
    torch.testing.assert_close(torch.bincount(codes, minlength=4) / 4000, probs, atol=0.03, rtol=0)
    top2 = set(probs.topk(2).indices.tolist())
    assert set(sample_codes(prior, 200, top_k=2).flatten().tolist()) == top2


def test_filter_logits_top_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 2.0], [4.0, 3.0, 2.0, 1.0]])
    kept = filter_logits(logits, top_k=2)
    expected = torch.tensor([[False, True, True, False], [True, True, False, False]])
    assert torch.equal(torch.isfinite(kept), expected)
    assert torch.equal(kept[torch.isfinite(kept)], torch.tensor([5.0, 3.0, 4.0, 3.0]))
    assert torch.equal(filter_logits(logits, top_k=4), logits)
    assert torch.isfinite(logits).all()  # pure: the input is untouched


def test_filter_logits_top_p():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logits = probs.log()
    finite = lambda **kw: torch.isfinite(filter_logits(logits, **kw))[0].tolist()
    assert finite(top_p=0.4) == [False, True, False, False]  # the most likely code alone reaches 0.4
    assert finite(top_p=0.7) == [False, True, False, True]
    assert finite(top_p=0.9) == [True, True, False, True]
    assert finite(top_p=1.0) == [True, True, True, True]
    assert finite(top_k=3, top_p=0.9) == [True, True, False, True]  # top-p on the renormalised top 3
    assert finite(top_k=2, top_p=0.6) == [False, True, False, False]  # 0.5 / 0.8 < 0.6 <= 1


def test_inverse_cdf_skips_zero_mass_codes():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5]]).expand(4, 4)
    uniforms = torch.tensor([0.0, 0.49, 0.5, 0.999])
    assert inverse_cdf(probs, uniforms).tolist() == [1, 1, 3, 3]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n=0), "n must be >= 1, got 0"),
        (dict(temperature=0.0), "temperature must be > 0, got 0.0"),
        (dict(top_k=0), "top_k must be in [1, 8], got 0"),
        (dict(top_k=9), "top_k must be in [1, 8], got 9"),
        (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
        (dict(top_p=0.0), "got 0.0"),
        (dict(cfg_scale=-1.0), "cfg_scale must be >= 0, got -1.0"),
        (dict(labels=torch.tensor([0, 1])), "shape (3,)"),
        (dict(labels=torch.tensor([0, 1, 5])), "got 5"),
        (dict(seeds=torch.tensor([1.0, 2.0, 3.0])), "torch.float32"),
        (dict(prefix=torch.zeros(3, 3, 2, dtype=torch.long), prefix_len=1), "got (3, 3, 2)"),
        (dict(prefix=torch.full((3, 3, 3), 8), prefix_len=1), "got 8"),
        (dict(prefix_len=10), "prefix_len must be in [0, 9], got 10"),
        (dict(prefix_len=2), "prefix_len is 2"),
        (dict(batch_size=0), "batch_size must be >= 1, got 0"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, message):
    prior = make_prior("transformer")
    kwargs = dict(n=3) | kwargs
    with pytest.raises(VQGenError, match=re.escape(message)):
        sample_codes(prior, kwargs.pop("n"), **kwargs)


def test_labels_on_an_unconditional_prior_are_refused():
    prior = make_prior("pixelcnn", num_classes=0)
    with pytest.raises(VQGenError, match=r"unconditional.*labels were given"):
        sample_codes(prior, 2, labels=torch.tensor([1, 0]))


def test_restores_mode_and_reports_progress(prior):
    done: list[int] = []
    prior.train()
    sample_codes(prior, 5, batch_size=2, progress=done.append)
    assert prior.training and done == [2, 2, 1]
    prior.eval()
    sample_codes(prior, 1)
    assert not prior.training
