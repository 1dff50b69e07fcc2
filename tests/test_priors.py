"""Both priors: config checks, causality without a blind spot, cached decoding, learning, bf16."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from stage2_prior.config import PixelCNNConfig, TransformerConfig
from stage2_prior.contract import check_codes, check_labels
from stage2_prior.pixelcnn import PixelCNNPrior
from stage2_prior.registry import PRIORS
from stage2_prior.sampling import sample_codes
from stage2_prior.transformer import KVCache, TransformerPrior, one_query_attention
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store.configs import config_from_dict, config_to_dict

KINDS = ["transformer", "pixelcnn"]


def test_every_raster_prior_is_tested_here():
    """Causality, cached decoding and raster sampling are tested for the raster kinds; the masked prior has
    none of them (it sees both sides, and decodes in parallel): tests/test_masked.py covers it."""
    assert KINDS == [name for name, kind in PRIORS.items() if kind.raster]
    assert [name for name, kind in PRIORS.items() if not kind.raster] == ["masked"]


def make_prior(kind: str, **fields) -> torch.nn.Module:
    """A tiny prior of either kind; `fields` override the shared and architecture fields."""
    shared = dict(codebook_size=8, grid_height=4, grid_width=4, num_classes=0, label_dropout=0.0) | fields
    if kind == "transformer":
        return TransformerPrior(TransformerConfig(**(dict(d_model=32, n_layers=2, n_heads=2) | shared)))
    return PixelCNNPrior(PixelCNNConfig(**(dict(channels=16, n_layers=5) | shared)))


@pytest.mark.parametrize(
    "cls, fields, bad",
    [
        (TransformerConfig, dict(codebook_size=1), "1"),
        (TransformerConfig, dict(grid_height=0), "0x4"),
        (TransformerConfig, dict(label_dropout=1.5), "1.5"),
        (TransformerConfig, dict(d_model=30, n_heads=4), "d_model=30"),
        (TransformerConfig, dict(num_classes=-2), "-2"),
        (PixelCNNConfig, dict(kernel_size=4), "4"),
        (PixelCNNConfig, dict(channels=0), "0"),
    ],
)
def test_config_rejects_bad_values(cls, fields, bad):
    with pytest.raises(VQGenError, match=bad):
        cls(**(dict(codebook_size=8, grid_height=4, grid_width=4) | fields))


@pytest.mark.parametrize("kind", KINDS)
def test_bad_inputs_name_the_value(kind):
    """`forward` checks what it can without reading values (no device sync); the value checks run
    where codes and labels enter: loading codes and sampling."""
    prior = make_prior(kind).eval()
    codes = torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(VQGenError, match="unconditional"):
        prior(codes, torch.tensor([3, 3]))
    with pytest.raises(VQGenError, match=r"\(2, 4, 5\)"):
        prior(torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(VQGenError, match="integer"):
        prior(codes.float())
    with pytest.raises(VQGenError, match="got 8"):
        check_codes(codes.clone().index_fill_(2, torch.tensor([1]), 8), prior.config)
    conditional = make_prior(kind, num_classes=3).eval()
    with pytest.raises(VQGenError, match="got 4"):
        check_labels(torch.tensor([0, 4]), 2, conditional.config)
    with pytest.raises(VQGenError, match="got -1"):
        sample_codes(conditional, 2, labels=torch.tensor([-1, 0]))
    with pytest.raises(VQGenError, match="got 8"):
        sample_codes(prior, 2, prefix=codes.clone().index_fill_(2, torch.tensor([1]), 8), prefix_len=4)
    assert conditional(codes, torch.tensor([0, 3])).shape == (2, 4, 4, 8)  # 3 is the null class


def perturbed_logits(prior: torch.nn.Module, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (t, k) of a random grid and (t, t, k) of the grids with code j changed, in row j."""
    cfg = prior.config
    t, k = cfg.seq_len, cfg.codebook_size
    base = torch.randint(0, k, (t,), generator=generator)
    grids = base.repeat(t + 1, 1)  # (t+1, t): row 0 the base, row j+1 with code j changed
    other = (base + 1 + torch.randint(0, k - 1, (t,), generator=generator)) % k  # (t,) never equal to base
    grids[torch.arange(1, t + 1), torch.arange(t)] = other
    with torch.no_grad():
        logits = prior(rearrange(grids, "b (h w) -> b h w", w=cfg.grid_width))
    logits = rearrange(logits, "b h w k -> b (h w) k")
    return logits[0], logits[1:]


@pytest.mark.parametrize("kind", KINDS)
def test_causal_and_no_blind_spot(kind):
    torch.manual_seed(0)
    prior = make_prior(kind).eval().double()  # float64: no rounding noise to hide a leak or a weak link
    with torch.no_grad():  # a clearer signal; PixelCNN causality lives in the mask buffers, not the weights
        for p in prior.parameters():
            p.mul_(2.0)
    base, changed = perturbed_logits(prior, torch.Generator().manual_seed(1))
    diff = (changed - base).abs().amax(dim=-1)  # (t, t): [j, i] = effect of code j on logits i
    t = base.shape[0]
    later_or_same = torch.ones(t, t).tril().bool()  # j >= i
    assert diff[later_or_same].max() <= 1e-12, "logits depend on the current or a later code"
    earlier = ~later_or_same
    assert diff[earlier].min() > 1e-6, f"blind spot: min effect of an earlier code is {diff[earlier].min():.2e}"


@pytest.mark.parametrize("kind", KINDS)
def test_step_matches_forward(kind):
    torch.manual_seed(0)
    prior = make_prior(kind, num_classes=3).eval()
    codes = torch.randint(0, 8, (3, 4, 4))
    labels = torch.tensor([0, 2, 3])  # 3 = null class
    with torch.no_grad():
        full = rearrange(prior(codes, labels), "b h w k -> b (h w) k")
        flat = rearrange(codes, "b h w -> b (h w)")
        state = prior.start(labels, 3)
        for pos in range(16):
            seen = flat.clone()
            seen[:, pos:] = torch.randint(0, 8, (3, 16 - pos))  # what is not sampled yet is noise
            logits, state = prior.step(state, seen, pos)
            torch.testing.assert_close(logits, full[:, pos], atol=1e-5, rtol=0)


def test_transformer_cache_is_used_not_recomputed():
    torch.manual_seed(0)
    prior = make_prior("transformer").eval()
    codes = torch.randint(0, 8, (2, 16))
    with torch.no_grad():
        full = rearrange(prior(rearrange(codes, "b (h w) -> b h w", w=4)), "b h w k -> b (h w) k")
        cache = prior.start(None, 2)
        assert isinstance(cache, KVCache) and cache.length == 1
        assert all(k.shape == (2, 2, 16, 16) for k in cache.k + cache.v)  # (b, nh, t, hd)
        for pos in range(16):
            fed = codes.clone()
            cached = slice(0, max(pos - 1, 0))  # codes already in the cache: a step must not read them again
            fed[:, cached] = (codes[:, cached] + 1) % 8
            logits, cache = prior.step(cache, fed, pos)
            assert cache.length == max(pos + 1, 1)
            torch.testing.assert_close(logits, full[:, pos], atol=1e-5, rtol=0)
        with pytest.raises(VQGenError, match="got 3"):
            prior.step(cache, codes, 3)



@pytest.mark.parametrize("height, width, kernel_size", [(3, 5, 3), (3, 5, 5), (5, 2, 5)])
def test_pixelcnn_step_reads_only_new_codes(height, width, kernel_size):
    """On non-square grids, step equals forward while every code it has already consumed is noise."""
    torch.manual_seed(0)
    prior = make_prior("pixelcnn", grid_height=height, grid_width=width, kernel_size=kernel_size, n_layers=4,
                       num_classes=3).eval()
    t = height * width
    flat = torch.randint(0, 8, (3, t))
    labels = torch.tensor([0, 2, 3])  # 3 = null class
    with torch.no_grad():
        full = rearrange(prior(rearrange(flat, "b (h w) -> b h w", w=width), labels), "b h w k -> b (h w) k")
        state = prior.start(labels, 3)
        for pos in range(t):
            fed = torch.randint(0, 8, (3, t))
            new = slice(pos - width, pos) if pos % width == 0 else slice(pos - 1, pos)  # the row above, or code pos-1
            fed[:, new] = flat[:, new]
            logits, state = prior.step(state, fed, pos)
            torch.testing.assert_close(logits, full[:, pos], atol=1e-5, rtol=0)
        with pytest.raises(VQGenError, match="got 3"):
            prior.step(state, flat, 3)


def test_pixelcnn_decoding_costs_no_more_than_one_forward():
    """Decoding a grid position by position takes no more conv FLOPs than scoring it once."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    prior = make_prior("pixelcnn", grid_height=6, grid_width=3, num_classes=2).eval()
    codes = torch.randint(0, 8, (2, 6, 3))
    with torch.no_grad():
        with FlopCounterMode(display=False) as scoring:
            prior(codes)
        state = prior.start(None, 2)
        with FlopCounterMode(display=False) as decoding:
            for pos in range(18):
                prior.step(state, rearrange(codes, "b h w -> b (h w)"), pos)
    assert 0 < decoding.get_total_flops() <= scoring.get_total_flops()


@pytest.mark.parametrize("kind", KINDS)
def test_label_changes_logits_and_dropout_uses_null(kind):
    torch.manual_seed(0)
    prior = make_prior(kind, num_classes=3, label_dropout=0.5)
    codes = torch.randint(0, 8, (1, 4, 4)).expand(64, 4, 4)
    prior.eval()
    with torch.no_grad():
        per_label = [prior(codes[:1], torch.tensor([c])) for c in range(4)]  # 3 = null
        assert all((per_label[a] - per_label[b]).abs().max() > 1e-4 for a in range(4) for b in range(a))
        prior.train()
        torch.manual_seed(1)
        trained = prior(codes, torch.full((64,), 1))
    is_null = (trained - per_label[3]).abs().amax(dim=(1, 2, 3)) < 1e-5
    is_label = (trained - per_label[1]).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert bool((is_null ^ is_label).all()) and 10 < int(is_null.sum()) < 54


# A toy code distribution with a known entropy: K=4, 2x3 grids drawn from four patterns.
PATTERNS = torch.tensor([[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 0], [3, 3, 1, 1, 2, 2], [0, 2, 2, 2, 1, 3]])
PROBS = torch.tensor([0.4, 0.3, 0.2, 0.1])


def nll_bits_per_code(prior: torch.nn.Module, grids: torch.Tensor, weights: torch.Tensor, labels=None) -> float:
    """Exact expected NLL (bits per code) of the weighted grids (m, t) under the prior."""
    with torch.no_grad():
        logits = prior(rearrange(grids, "m (h w) -> m h w", w=3), labels)
    nll = F.cross_entropy(rearrange(logits, "m h w k -> m k (h w)"), grids, reduction="none").sum(1)  # (m,) nats
    return float((weights * nll).sum()) / grids.shape[1] / math.log(2)


def train(prior: torch.nn.Module, steps: int, batch, lr: float = 3e-3) -> None:
    """Adam with a linearly decayed rate on minibatches `batch(gen) -> (grids (b, t), labels or None)`."""
    opt = torch.optim.Adam(prior.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.02, total_iters=steps)  # no late Adam spikes
    gen = torch.Generator().manual_seed(0)
    prior.train()
    for _ in range(steps):
        grids, labels = batch(gen)
        logits = prior(rearrange(grids, "b (h w) -> b h w", w=3), labels)
        loss = F.cross_entropy(rearrange(logits, "b h w k -> b k (h w)"), grids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    prior.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_learns_toy_distribution_to_its_entropy(kind):
    torch.manual_seed(0)
    prior = make_prior(kind, codebook_size=4, grid_height=2, grid_width=3, n_layers=3)
    entropy = float(-(PROBS * PROBS.log2()).sum()) / 6  # bits per code
    train(prior, 200, lambda g: (PATTERNS[torch.multinomial(PROBS, 64, replacement=True, generator=g)], None))
    nll = nll_bits_per_code(prior, PATTERNS, PROBS)
    assert entropy <= nll + 1e-4 and nll - entropy < 0.05, f"nll {nll:.3f} vs entropy {entropy:.3f} bits/code"


@pytest.mark.parametrize("kind", KINDS)
def test_learns_label_conditional_toy(kind):
    torch.manual_seed(0)
    toy = dict(codebook_size=4, grid_height=2, grid_width=3, n_layers=3)
    prior = make_prior(kind, **toy, num_classes=4, label_dropout=0.1)

    def batch(g):
        labels = torch.randint(0, 4, (64,), generator=g)
        return PATTERNS[labels], labels

    train(prior, 200, batch)
    nll = nll_bits_per_code(prior, PATTERNS, torch.full((4,), 0.25), labels=torch.arange(4))
    assert nll < 0.05, f"conditional nll {nll:.3f} bits/code"


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_gives_finite_logits(kind):
    torch.manual_seed(0)
    prior = make_prior(kind, num_classes=2).eval()
    codes = torch.randint(0, 8, (2, 4, 4))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = prior(codes, torch.tensor([0, 1]))
        state = prior.start(torch.tensor([0, 2]), 2)
        steps = [prior.step(state, rearrange(codes, "b h w -> b (h w)"), pos)[0] for pos in range(16)]
    assert logits.shape == (2, 4, 4, 8) and torch.isfinite(logits).all()
    assert all(torch.isfinite(s).all() for s in steps)


@pytest.mark.parametrize("kind", KINDS)
def test_large_grid_is_causal_without_a_blind_spot(kind):
    """16x16 grids (256 codes): the position embeddings and masks hold beyond the small test grids."""
    torch.manual_seed(0)
    prior = make_prior(kind, grid_height=16, grid_width=16, n_layers=3).eval().double()
    with torch.no_grad():
        for p in prior.parameters():
            p.mul_(2.0)
    base, changed = perturbed_logits(prior, torch.Generator().manual_seed(1))
    diff = (changed - base).abs().amax(dim=-1)  # (t, t)
    later_or_same = torch.ones(256, 256).tril().bool()
    assert diff[later_or_same].max() <= 1e-12
    # the PixelCNN's receptive field grows with depth: near codes must reach every later position they can
    assert diff[~later_or_same].max() > 1e-6 and (diff[:-1].amax(dim=1) > 1e-6).all()


@pytest.mark.parametrize("length", [1, 7, 256])
def test_step_attention_kernels_agree(length):
    """The cached step's two attention paths, the fused call that CUDA takes (cuDNN's backend excluded)
    and the CPU's matmuls, give one result, and it is softmax(q k^T / sqrt(hd)) v."""
    torch.manual_seed(0)
    q = torch.randn(3, 4, 1, 32, dtype=torch.float64)
    keys, values = (torch.randn(3, 4, length, 32, dtype=torch.float64) for _ in range(2))
    fused = one_query_attention(q, keys, values, fused=True)
    plain = one_query_attention(q, keys, values, fused=False)
    expected = torch.softmax(q @ keys.transpose(-2, -1) / math.sqrt(32), dim=-1) @ values
    assert fused.shape == plain.shape == (3, 4, 1, 32)
    torch.testing.assert_close(fused, expected)
    torch.testing.assert_close(plain, expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", [16, 32])
def test_cached_sampling_equals_uncached_on_large_grids(kind, side):
    """At 16x16 and 32x32 (1,024 codes) every cached step gives the logits of a full forward pass."""
    torch.manual_seed(0)
    prior = make_prior(kind, grid_height=side, grid_width=side, num_classes=2).eval()
    t = side * side
    codes = torch.randint(0, 8, (2, side, side))
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        full = rearrange(prior(codes, labels), "b h w k -> b (h w) k")
        flat = rearrange(codes, "b h w -> b (h w)")
        state = prior.start(labels, 2)
        worst = 0.0
        for pos in range(t):
            logits, state = prior.step(state, flat, pos)
            worst = max(worst, float((logits - full[:, pos]).abs().max()))
    assert worst < 1e-4, f"cached logits differ from the forward pass by {worst:.2e}"


def modulated(prior: TransformerPrior) -> TransformerPrior:
    """`prior` with its class modulation drawn at random (it starts at zero), so that a test sees it act."""
    with torch.no_grad():
        prior.class_mod.proj.weight.normal_(0.0, 0.5)
    return prior


def test_class_modulation_starts_as_the_plain_prior():
    """Zero-initialised, the modulation leaves a fresh prior's logits those of the same weights without it."""
    torch.manual_seed(0)
    plain = make_prior("transformer", num_classes=3).eval()
    with_mod = make_prior("transformer", num_classes=3, class_modulation=True).eval()
    missing, unexpected = with_mod.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["class_mod.proj.weight", "class_mod.proj.bias"] and not unexpected
    codes, labels = torch.randint(0, 8, (4, 4, 4)), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(with_mod(codes, labels), plain(codes, labels), atol=0, rtol=0)
        modulated(with_mod)
        assert (with_mod(codes, labels) - plain(codes, labels)).abs().max() > 1e-3


def test_class_modulation_is_causal_and_cached():
    """Each grid's class scales and shifts every block: still no code at or after a place reaches its logits,
    the cached steps equal the forward pass, and each class (null included) gives other logits."""
    torch.manual_seed(0)
    prior = modulated(make_prior("transformer", num_classes=3, class_modulation=True)).eval().double()
    base, changed = perturbed_logits(prior, torch.Generator().manual_seed(1))  # the null class's modulation
    diff = (changed - base).abs().amax(dim=-1)
    later_or_same = torch.ones(16, 16).tril().bool()
    assert diff[later_or_same].max() <= 1e-12 and diff[~later_or_same].min() > 1e-6
    codes, labels = torch.randint(0, 8, (1, 4, 4)).expand(4, 4, 4), torch.tensor([0, 1, 2, 3])  # one grid
    with torch.no_grad():
        full = rearrange(prior(codes, labels), "b h w k -> b (h w) k")
        state = prior.start(labels, 4)
        for pos in range(16):
            logits, state = prior.step(state, rearrange(codes, "b h w -> b (h w)"), pos)
            torch.testing.assert_close(logits, full[:, pos], atol=1e-10, rtol=0)
    assert all((full[a] - full[b]).abs().max() > 1e-4 for a in range(4) for b in range(a))


def test_class_modulation_needs_classes_and_older_priors_load_without_it():
    with pytest.raises(VQGenError, match="unconditional"):
        TransformerConfig(codebook_size=8, grid_height=4, grid_width=4, class_modulation=True)
    saved = config_to_dict(TransformerConfig(codebook_size=8, grid_height=4, grid_width=4, num_classes=3))
    del saved["class_modulation"]
    older = config_from_dict(TransformerConfig, {**saved, "format_version": 8})  # written before the field
    assert older.class_modulation is False and make_prior("transformer", num_classes=3).class_mod is None
    with pytest.raises(VQGenError, match="missing fields"):
        config_from_dict(TransformerConfig, saved)  # a current file without it is damaged
