"""The coarse-first benchmark (scripts/benchmarks/coarse_first.py): its grids and its restricted sampling."""

import json

import torch
from einops import rearrange

from conftest import load_script
from stage2_prior.config import TransformerConfig
from stage2_prior.sampling import sample_codes
from stage2_prior.transformer import TransformerPrior
from vqgen.core.store.codes import load_codes
from vqgen.core.store.layout import RunLayout
from vqgen.run import Run

coarse = load_script("benchmarks/coarse_first")


def test_a_stacked_grid_holds_the_top_codes_shifted_past_k_then_the_bottom_grid():
    top = torch.tensor([[[0, 1], [2, 3]]])  # (1, 2, 2)
    bottom = torch.arange(16).view(1, 4, 4)
    grid = coarse.stacked(top, bottom, k=16, width=4)
    assert grid.shape == (1, 5, 4)
    assert grid[0, 0].tolist() == [16, 17, 18, 19]      # the top grid in raster order, ids k ...
    assert torch.equal(grid[0, 1:], bottom[0])          # then the bottom grid, as it was


def test_restricted_sampling_draws_top_codes_first_and_bottom_codes_after():
    # an untrained prior spreads its draws over all 24 ids; restricted, each part keeps to its own
    prior = TransformerPrior(TransformerConfig(codebook_size=24, grid_height=5, grid_width=4, d_model=16, n_layers=1,
                                               n_heads=2))
    grids = rearrange(sample_codes(coarse.Restricted(prior, top_positions=4, bottom_codes=16), 64), "n h w -> n (h w)")
    assert int(grids[:, :4].min()) >= 16 and int(grids[:, 4:].max()) < 16
    free = rearrange(sample_codes(prior, 64), "n h w -> n (h w)")
    assert int(free[:, 4:].max()) >= 16  # the check above could fail


def test_build_keeps_each_bottom_grid_and_its_labels_under_the_top_codes_of_its_pooled_vectors(tiny_run, tmp_path):
    out = tmp_path / "coarse"
    info = coarse.build(tiny_run, out, top_codes=4, pool=2, seed=0)
    splits, meta = load_codes(RunLayout(tiny_run).codes)
    stacked, stacked_meta = load_codes(RunLayout(out).codes)
    h, w, k = meta.grid_height, meta.grid_width, meta.codebook_size
    top_rows = info["top_rows"]
    assert top_rows == (h // 2) * (w // 2) // w
    assert (stacked_meta.codebook_size, stacked_meta.grid_height, stacked_meta.grid_width) == (k + 4, h + top_rows, w)
    assert stacked_meta.vqvae_fingerprint == meta.vqvae_fingerprint
    run = Run.load(tiny_run, need_prior=False)
    for name, split in splits.items():
        grids = stacked[name].codes.long()
        assert torch.equal(grids[:, top_rows:], split.codes.long())
        assert torch.equal(stacked[name].labels, split.labels)
        top = rearrange(grids[:, :top_rows], "n a b -> n (a b)") - k
        assert 0 <= int(top.min()) and int(top.max()) < 4
        # grids whose pooled vectors are equal get the same top code: one cluster per distinct vector at least
        vectors = rearrange(coarse.pooled_vectors(run, split.codes, 2), "n a b d -> (n a b) d")
        same = (vectors[:, None] - vectors[None]).abs().amax(-1) == 0
        flat = top.flatten()
        assert torch.equal(flat[:, None] == flat[None], (flat[:, None] == flat[None]) | same)
    assert json.loads((out / "coarse_first_codes.json").read_text())["top_codes"] == 4
