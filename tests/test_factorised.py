"""Large K: the chunked nearest-code search, factorised (l2-normalised, low-dimensional) codes, and a
k-means sample smaller than K."""

import pytest
import torch
import torch.nn.functional as F

import stage1_vqvae.quantizer as quantizer
from conftest import load_script
from stage1_vqvae.config import VQVAEConfig
from stage1_vqvae.model import VQVAE, kmeans_sample_note
from stage1_vqvae.quantizer import (
    VectorQuantizer,
    ema_update,
    flatten_vectors,
    kmeans,
    nearest_codes,
    squared_distances,
    unflatten_vectors,
)
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store.configs import FORMAT_VERSION, config_from_dict, config_to_dict
from vqgen.core.store.weights import load_model, save_model

# --- chunked distances -----------------------------------------------------------------


def test_chunked_search_equals_unchunked_ties_included():
    g = torch.Generator().manual_seed(0)
    codebook = torch.randint(-3, 4, (40, 3), generator=g).float()
    codebook[25:30] = codebook[5:10]  # exact duplicates: the lower index must win in every chunk
    z = torch.cat([torch.randint(-3, 4, (150, 3), generator=g).float(),  # on the integer grid: many ties
                   torch.randn(150, 3, generator=g) * 3])
    whole = nearest_codes(z, codebook, max_elements=10**9)
    for rows in (1, 3, 7, 64, 299):
        assert torch.equal(nearest_codes(z, codebook, max_elements=rows * 40), whole), rows
    # the same argmin as the squared distances, ties resolved to the lowest index
    d = squared_distances(z, codebook)
    first_min = (d == d.min(dim=1, keepdim=True).values).float().argmax(dim=1)
    assert torch.equal(whole, first_min)
    assert not (whole >= 25).logical_and(whole < 30).any()


def test_the_largest_distance_block_is_bounded(monkeypatch):
    blocks = []
    real = quantizer.distance_scores

    def spy(z, codebook, codebook_sq):
        blocks.append(tuple(z.shape[:1]) + tuple(codebook.shape[:1]))
        return real(z, codebook, codebook_sq)

    monkeypatch.setattr(quantizer, "distance_scores", spy)
    vq = VectorQuantizer(16384, 8, lookup_dim=4, kmeans_init=False, restart_after=0).eval()
    z_e = torch.randn(2, 8, 32, 32)  # 2048 vectors: (2048, 16384) would be 2^25 distances
    out = vq(z_e)
    assert blocks and max(m * k for m, k in blocks) <= quantizer.MAX_DISTANCE_ELEMENTS == 2**24
    assert sum(m for m, _ in blocks) == 2048 and {k for _, k in blocks} == {16384}
    monkeypatch.setattr(quantizer, "distance_scores", real)
    assert torch.equal(out.indices.flatten(), nearest_codes(vq.to_lookup(flatten_vectors(z_e)), vq.codes(),
                                                             max_elements=2**26))
    # the bound is read at call time: training, encoding and k-means all go through nearest_codes
    blocks.clear()
    monkeypatch.setattr(quantizer, "distance_scores", spy)
    monkeypatch.setattr(quantizer, "MAX_DISTANCE_ELEMENTS", 16 * 64)
    kmeans(torch.randn(300, 3), 64, iters=2)
    assert blocks and max(m for m, _ in blocks) == 16


# --- factorised codes ------------------------------------------------------------------


def factorised(beta=0.25, **kwargs):
    torch.manual_seed(0)
    return VectorQuantizer(32, 6, beta=beta, lookup_dim=3, kmeans_init=False, restart_after=0, **kwargs)


def test_factorised_codes_are_unit_vectors_searched_by_cosine():
    vq = factorised().eval()
    z_e = torch.randn(2, 6, 3, 3)
    out = vq(z_e)
    u = vq.to_lookup(flatten_vectors(z_e))  # (m, l)
    torch.testing.assert_close(u.norm(dim=1), torch.ones(18))
    torch.testing.assert_close(vq.codes().norm(dim=1), torch.ones(32))
    cosine = u @ vq.codes().t()
    assert torch.equal(out.indices.flatten(), cosine.argmax(dim=1))
    assert vq.codebook.shape == (32, 3) and out.z_q.shape == (2, 6, 3, 3)
    assert torch.equal(out.z_q, vq.decode_indices(out.indices))  # decoding codes gives what training decoded


def test_factorised_straight_through_gradient_is_exact():
    """The decoder's gradient reaches z_e as if quantization were the identity in the lookup space."""
    vq = factorised()
    z_e = torch.randn(2, 6, 2, 3, requires_grad=True)
    out = vq(z_e)
    upstream = torch.randn_like(out.z_q)
    (out.z_q * upstream).sum().backward()
    smooth = unflatten_vectors(vq.from_lookup(vq.to_lookup(flatten_vectors(z_e))), 2, 2, 3)
    (expected,) = torch.autograd.grad(smooth, z_e, upstream)
    torch.testing.assert_close(z_e.grad, expected, rtol=0, atol=1e-7)
    assert vq.codebook.grad is None or torch.all(vq.codebook.grad == 0)  # the decoder never moves the codes


@pytest.mark.parametrize("beta", [0.25, 1.0])
def test_factorised_losses_keep_their_definitions_in_the_lookup_space(beta):
    vq = factorised(beta)
    z_e = torch.randn(2, 6, 2, 2, requires_grad=True)
    out = vq(z_e)
    out.loss.backward()
    idx = out.indices.flatten()
    u = vq.to_lookup(flatten_vectors(z_e))  # (m, l)
    q = vq.codes()[idx]  # (m, l)
    torch.testing.assert_close(out.codebook_loss, F.mse_loss(q, u.detach()))
    torch.testing.assert_close(out.commitment_loss, F.mse_loss(u, q.detach()))
    # commitment: beta * |u - sg[e]|^2 moves the encoder side (z_e and the projection down) only
    (expected_z,) = torch.autograd.grad(beta * F.mse_loss(u, q.detach()), z_e, retain_graph=True)
    torch.testing.assert_close(z_e.grad, expected_z)
    # codebook: |sg[u] - e|^2 moves the codes only, whatever beta
    (expected_codes,) = torch.autograd.grad(F.mse_loss(q, u.detach()), vq.codebook)
    torch.testing.assert_close(vq.codebook.grad, expected_codes)
    assert vq.proj_out.weight.grad is None  # no loss term reaches the projection back up


def test_factorised_ema_follows_the_assigned_unit_vectors():
    vq = factorised(update="ema", ema_decay=0.5)
    vq.ema_cluster_size.fill_(1.0)
    vq.ema_sum.copy_(vq.codebook)
    before_size, before_sum = vq.ema_cluster_size.clone(), vq.ema_sum.clone()
    z_e = torch.randn(2, 6, 2, 2)
    out = vq.train()(z_e)
    with torch.no_grad():
        u = vq.to_lookup(flatten_vectors(z_e))
    idx = out.indices.flatten()
    counts = torch.bincount(idx, minlength=32).float()
    sums = torch.zeros(32, 3).index_add_(0, idx, u)
    _, _, expected = ema_update(before_size, before_sum, counts, sums, 0.5, vq.ema_eps)
    torch.testing.assert_close(vq.codebook, expected)
    assert float(out.codebook_loss) == 0 and not isinstance(vq.codebook, torch.nn.Parameter)
    torch.testing.assert_close(vq.codes().norm(dim=1), torch.ones(32))  # searched as unit vectors


def corners(n_per: int, generator: torch.Generator) -> torch.Tensor:
    """(8 * n_per, 3): points near the 8 directions (+-1, +-1, +-1), at random lengths."""
    signs = torch.tensor([[a, b, c] for a in (-1.0, 1.0) for b in (-1.0, 1.0) for c in (-1.0, 1.0)])
    x = signs.repeat_interleave(n_per, 0) + 0.05 * torch.randn(8 * n_per, 3, generator=generator)
    return x * (0.5 + torch.rand(8 * n_per, 1, generator=generator))


def as_z_e(x: torch.Tensor) -> torch.Tensor:
    """(m, 3) rows -> (1, 3, 1, m) encoder output."""
    return unflatten_vectors(x, 1, 1, x.shape[0])


def identity_projection(vq: VectorQuantizer) -> VectorQuantizer:
    with torch.no_grad():
        vq.proj_in.weight.copy_(torch.eye(3)), vq.proj_in.bias.zero_()
    return vq


def test_spherical_kmeans_converges_to_normalised_means():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(corners(20, g), dim=1)
    c = kmeans(x, 8, iters=20, generator=g, spherical=True)
    torch.testing.assert_close(c.norm(dim=1), torch.ones(8))
    assign = nearest_codes(x, c)
    means = F.normalize(torch.zeros(8, 3).index_add_(0, assign, x), dim=1)
    used = torch.bincount(assign, minlength=8) > 0
    torch.testing.assert_close(c[used], means[used])  # Lloyd's fixed point, by cosine


def test_factorised_kmeans_and_restarts_keep_every_code_in_use():
    torch.manual_seed(0)  # the restarts draw from the global generator
    g = torch.Generator().manual_seed(1)
    vq = identity_projection(VectorQuantizer(8, 3, lookup_dim=3, restart_after=2)).train()
    first = corners(20, g)[::40]  # 4 vectors for 8 codes: 4 repeats
    vq(as_z_e(first))
    assert int(vq(as_z_e(corners(20, g))).counts.gt(0).sum()) <= 4
    for _ in range(20):
        vq(as_z_e(corners(20, g)))
    out = vq.eval()(as_z_e(corners(20, g)))
    assert int(out.counts.gt(0).sum()) == 8 and vq.dead_codes == 0


# --- fewer k-means vectors than codes ---------------------------------------------------


def test_kmeans_with_fewer_vectors_than_codes_uses_every_vector():
    x = torch.randn(5, 3)
    c = kmeans(x, 12, iters=3, generator=torch.Generator().manual_seed(0))
    assert c.shape == (12, 3)
    assert torch.cdist(x, c).min(dim=1).values.max() == 0  # every vector is a code
    assert nearest_codes(x, c).unique().numel() == 5  # the 7 repeats are never chosen


def test_codes_started_as_repeats_are_restarted_into_use():
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 3, restart_after=2).train()
    vq(torch.randn(1, 3, 2, 4))  # 8 vectors for 32 codes: 24 repeats
    assert int(torch.bincount(vq(torch.randn(1, 3, 16, 16)).indices.flatten(), minlength=32).gt(0).sum()) <= 8
    for _ in range(12):
        vq(torch.randn(1, 3, 16, 16))
    used = torch.bincount(vq.eval()(torch.randn(4, 3, 32, 32)).indices.flatten(), minlength=32).gt(0)
    assert int(used.sum()) == 32


def test_kmeans_sample_note_logs_the_fallback_and_refuses_it_without_restarts():
    cfg = VQVAEConfig(image_height=64, image_width=64, codebook_size=16384)  # 16x16 grid
    assert kmeans_sample_note(cfg, 64) is None  # 64 x 256 vectors = K
    note = kmeans_sample_note(cfg, 32)
    assert "8192 of the 16384 codes" in note and "the other 8192 start as repeats" in note
    assert kmeans_sample_note(VQVAEConfig(image_height=64, image_width=64, codebook_size=16384,
                                          kmeans_init=False, restart_after=0), 32) is None
    with pytest.raises(VQGenError, match=r"codebook_size 16384 is larger than the 8192 vectors of a batch "
                                         r"\(32 images x 16x16\).*restart_after is 0.*batch size to 64"):
        kmeans_sample_note(VQVAEConfig(image_height=64, image_width=64, codebook_size=16384, restart_after=0), 32)


TINY_CLI = ["--hidden-channels", "16", "--res-channels", "8", "--code-dim", "8", "--max-steps", "2",
            "--batch-size", "4", "--no-encode", "--builtin-train-size", "16", "--builtin-test-size", "8"]


@pytest.mark.parametrize("argv,expected", [
    (["--codebook-size", "512", "--restart-after", "0"],
     "codebook_size 512 is larger than the 256 vectors of a batch (4 images x 8x8)"),
    (["--code-lookup-dim", "1"], "code_lookup_dim must be 0 (off) or in [2, code_dim=8], got 1"),
    (["--code-lookup-dim", "16"], "code_lookup_dim must be 0 (off) or in [2, code_dim=8], got 16"),
])
def test_bad_large_k_options_are_one_line_and_write_nothing(tmp_path, capsys, argv, expected):
    main = load_script("train_vqvae").main
    run = tmp_path / "run"
    try:
        code = main(TINY_CLI + argv + ["--run", str(run)])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and err.count("\n") == 0, err
    assert expected in err
    assert not (run / "vqvae" / "config.json").exists()


def test_training_logs_the_kmeans_fallback_and_trains_factorised(tmp_path, capsys):
    main = load_script("train_vqvae").main
    code = main(TINY_CLI + ["--codebook-size", "512", "--code-lookup-dim", "4", "--run", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code in (0, None)
    assert "warning: k-means initialises 256 of the 512 codes" in " ".join(out.split())
    model = load_model(VQVAE, VQVAEConfig, tmp_path / "run" / "vqvae")
    assert model.config.code_lookup_dim == 4 and model.quantizer.codebook.shape == (512, 4)


# --- config and weights -----------------------------------------------------------------


def test_factorised_config_round_trips_and_old_configs_load(tmp_path):
    cfg = VQVAEConfig(codebook_size=64, code_dim=8, hidden_channels=16, res_channels=8, code_lookup_dim=4)
    assert config_from_dict(VQVAEConfig, config_to_dict(cfg)) == cfg
    old = config_to_dict(VQVAEConfig())
    del old["code_lookup_dim"]
    for version in range(1, 3):  # files written before format 3 have no such field: it is off
        assert config_from_dict(VQVAEConfig, {**old, "format_version": version}).code_lookup_dim == 0
    assert FORMAT_VERSION >= 3
    with pytest.raises(VQGenError, match=r"missing fields \['code_lookup_dim'\]"):
        config_from_dict(VQVAEConfig, old)  # a file of format 3 or later must have it
    model = VQVAE(cfg).eval()
    save_model(model, cfg, tmp_path / "vqvae")
    loaded = load_model(VQVAE, VQVAEConfig, tmp_path / "vqvae").eval()
    codes = torch.randint(64, (2, 8, 8))
    assert torch.equal(loaded.decode(codes), model.decode(codes))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded(x).recon, loaded.decode(loaded.encode(x)))  # decode(codes) = the eval forward


@pytest.mark.parametrize("value", [1, -4, 65])
def test_bad_lookup_dim_is_refused_by_name(value):
    with pytest.raises(VQGenError, match=rf"code_lookup_dim must be 0 \(off\) or in \[2, code_dim=64\], got {value}"):
        VQVAEConfig(code_lookup_dim=value)


def test_factorised_quantizer_stays_fp32_under_bf16_autocast():
    vq = factorised()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq.train()(torch.randn(2, 6, 2, 2).to(torch.bfloat16))
    assert out.z_q.dtype == out.loss.dtype == torch.float32
    assert vq.codebook.dtype == vq.proj_in.weight.dtype == torch.float32
