"""GPT-style prior: a decoder-only pre-LN Transformer over the code grid in raster order.

Input token i is the start (class) token for i = 0 and code i-1 otherwise, plus the row and
column embeddings of position i; output i is the distribution of code i.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from stage2_prior.config import TransformerConfig
from stage2_prior.contract import check_code_shape, drop_codes, drop_labels, resolve_labels
from vqgen.core.runtime.errors import VQGenError

# The cached step's key length grows by one per code. cuDNN's fused attention, which PyTorch prefers on
# Hopper for fp16/bf16, builds a plan for every new shape: on an H200 that cost 53 ms per step against
# 0.2 ms for the flash / memory-efficient kernels (`scripts/benchmarks/speed.py --only attention`).
_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def one_query_attention(q: Tensor, keys: Tensor, values: Tensor, fused: bool | None = None) -> Tensor:
    """(b, nh, 1, hd) query against (b, nh, L, hd) keys and values -> (b, nh, 1, hd), L any length;
    `fused` (default: on CUDA) picks the kernel, not the result."""
    if fused is None:
        fused = q.is_cuda
    if fused:
        with sdpa_kernel(_NO_CUDNN):
            return F.scaled_dot_product_attention(q, keys, values)
    # On the CPU two small matmuls and a softmax beat the fused call for one query (sampling 17-19 % faster).
    weights = (q @ keys.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)  # (b, nh, 1, L)
    return weights @ values




@dataclass
class KVCache:
    """Keys and values of the tokens fed so far, one preallocated (b, nh, t, hd) pair per layer."""

    k: list[Tensor]
    v: list[Tensor]
    length: int  # tokens cached: the start token, then codes 0 .. length-2
    logits: Tensor  # (b, k) output of the last cached token: the distribution of code length-1
    mods: list[Tensor | None]  # each block's (b, 4, d) class modulation (`ClassModulation`), or None


class SelfAttention(nn.Module):
    """Multi-head causal self-attention (every position sees all when `causal=False`, as the masked prior's
    does); `decode` attends from one new token to a cache."""

    def __init__(self, cfg: TransformerConfig, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        qkv = rearrange(self.qkv(x), "b t (three nh hd) -> three b nh t hd", three=3, nh=self.n_heads)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: Tensor) -> Tensor:
        """(b, t, d) -> (b, t, d), each position attending to itself and earlier ones (all, if not causal)."""
        q, k, v = self._split(x)  # (b, nh, t, hd)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, dropout_p=dropout)
        return self.proj(rearrange(y, "b nh t hd -> b t (nh hd)"))

    def decode(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int) -> Tensor:
        """(b, 1, d) token at `pos` -> (b, 1, d); writes its key and value into the cache at `pos`."""
        q, k, v = self._split(x)  # (b, nh, 1, hd)
        k_cache[:, :, pos : pos + 1] = k
        v_cache[:, :, pos : pos + 1] = v
        keys = k_cache[:, :, : pos + 1].to(q.dtype)  # (b, nh, pos+1, hd); a no-op unless autocast changed
        values = v_cache[:, :, : pos + 1].to(q.dtype)
        y = one_query_attention(q, keys, values)  # (b, nh, 1, hd); nothing after pos is cached: no mask
        return self.proj(rearrange(y, "b nh t hd -> b t (nh hd)"))


class Block(nn.Module):
    """Pre-LN Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: TransformerConfig, causal: bool = True):
        super().__init__()
        d = cfg.d_model
        self.ln1 = nn.LayerNorm(d)
        self.attn = SelfAttention(cfg, causal)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(), nn.Linear(cfg.mlp_ratio * d, d))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mod: Tensor | None = None) -> Tensor:
        """(b, t, d) -> (b, t, d); `mod`: this block's (b, 4, d) class modulation or None."""
        x = x + self.drop(self.attn(modulate(self.ln1(x), mod, 0)))
        return x + self.drop(self.mlp(modulate(self.ln2(x), mod, 2)))

    def decode(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int, mod: Tensor | None = None) -> Tensor:
        """(b, 1, d) -> (b, 1, d) for one new token at `pos`."""
        x = x + self.drop(self.attn.decode(modulate(self.ln1(x), mod, 0), k_cache, v_cache, pos))
        return x + self.drop(self.mlp(modulate(self.ln2(x), mod, 2)))


class ClassModulation(nn.Module):
    """Adaptive layer norm by class, as DiT conditions its blocks: the class's embedding (the start token's)
    mapped by one shared linear layer to a shift and scale of every block's two normalised inputs, before
    attention and before the MLP. A class owns no weights of its own here, and the map is weight-decayed with
    the other linear layers; it starts at zero, so a fresh prior computes what it would without it."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_layers = cfg.n_layers
        self.proj = nn.Linear(cfg.d_model, cfg.n_layers * 4 * cfg.d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, class_emb: Tensor) -> list[Tensor]:
        """(b, d) class embeddings -> each block's (b, 4, d): shift and factor (1 + the learned scale) before
        attention, then before the MLP. The 1 is added here, once per sample, not at every cached step."""
        mods = rearrange(self.proj(class_emb), "b (l four d) -> l b four d", l=self.n_layers, four=4)
        return list(mods + mods.new_tensor([0.0, 1.0, 0.0, 1.0])[:, None])


def class_modulation(cfg: TransformerConfig) -> ClassModulation | None:
    """The prior's `ClassModulation` where its config asks for one."""
    return ClassModulation(cfg) if cfg.class_modulation else None


def block_mods(modulation: ClassModulation | None, class_emb: Tensor, n_layers: int) -> list[Tensor | None]:
    """Each block's class modulation for these (b, d) class embeddings, or None for every block of a prior
    without one."""
    return [None] * n_layers if modulation is None else modulation(class_emb)


def modulate(x: Tensor, mod: Tensor | None, i: int) -> Tensor:
    """x (b, t, d) scaled by mod[:, i+1] and shifted by mod[:, i] (adaptive layer norm); x itself for None."""
    if mod is None:
        return x
    return x * mod[:, None, i + 1] + mod[:, None, i]


class TransformerPrior(nn.Module):
    """p(codes | class) as a GPT; `forward` teacher-forces a grid, `start`/`step` decode with a KV cache."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.start_emb = nn.Embedding(config.num_classes + 1, d)  # each class, then null (alone if unconditional)
        self.code_emb = nn.Embedding(config.codebook_size, d)
        self.row_emb = nn.Parameter(torch.randn(config.grid_height, d) * 0.02)
        self.col_emb = nn.Parameter(torch.randn(config.grid_width, d) * 0.02)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.codebook_size, bias=False)
        self.class_mod = class_modulation(config)
        self.apply(_init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual branches scaled down with depth
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layers))

    def _positions(self) -> Tensor:
        """(t, d) row plus column embedding of every raster position."""
        return rearrange(self.row_emb[:, None] + self.col_emb[None], "h w d -> (h w) d")

    def forward(self, codes: Tensor, labels: Tensor | None = None) -> Tensor:
        """(b, h, w) codes, (b,) labels or None (null class) -> (b, h, w, k) logits, teacher-forced."""
        cfg = self.config
        check_code_shape(codes, cfg)
        labels = resolve_labels(labels, codes.shape[0], cfg, codes.device)
        codes = codes.long()
        if self.training:
            labels, codes = drop_labels(labels, cfg), drop_codes(codes, cfg)
        codes = rearrange(codes, "b h w -> b (h w)")
        start = self.start_emb(labels)  # (b, d)
        tokens = torch.cat([start[:, None], self.code_emb(codes[:, :-1])], dim=1)  # (b, t, d)
        x = self.drop(tokens + self._positions())
        for block, mod in zip(self.blocks, block_mods(self.class_mod, start, cfg.n_layers)):
            x = block(x, mod)
        logits = self.head(self.ln_f(x))  # (b, t, k)
        return rearrange(logits, "b (h w) k -> b h w k", h=cfg.grid_height)

    def start(self, labels: Tensor | None, batch_size: int) -> KVCache:
        """A fresh cache (b rows) holding the start token; labels may include the null class."""
        cfg = self.config
        device, dtype = self.head.weight.device, self.head.weight.dtype
        if torch.is_autocast_enabled(device.type):  # keys and values come out of autocast's linears
            dtype = torch.get_autocast_dtype(device.type)
        start = self.start_emb(resolve_labels(labels, batch_size, cfg, device))  # (b, d)
        shape = (batch_size, cfg.n_heads, cfg.seq_len, cfg.d_model // cfg.n_heads)  # (b, nh, t, hd)
        cache = KVCache(
            k=[torch.empty(shape, device=device, dtype=dtype) for _ in self.blocks],
            v=[torch.empty(shape, device=device, dtype=dtype) for _ in self.blocks],
            length=0,
            logits=torch.empty(0, device=device),
            mods=block_mods(self.class_mod, start, cfg.n_layers),
        )
        self._feed(cache, start)
        return cache

    def step(self, cache: KVCache, codes: Tensor, pos: int) -> tuple[Tensor, KVCache]:
        """(b, t) codes filled before `pos` -> (b, k) logits of code `pos`.

        Feeds code pos-1 into the cache, unless the cache already holds token pos (pos 0: `start` did).
        """
        if pos == cache.length:
            self._feed(cache, self.code_emb(codes[:, pos - 1]))
        elif pos != cache.length - 1:
            expected = f"{cache.length - 1} or {cache.length}"
            raise VQGenError(f"step expects pos {expected} (the cache holds {cache.length} tokens), got {pos}")
        return cache.logits, cache

    def _feed(self, cache: KVCache, token: Tensor) -> None:
        """Append one (b, d) token embedding at position `cache.length`; keep its logits."""
        pos = cache.length
        row, col = divmod(pos, self.config.grid_width)  # only this position's embedding, not the whole grid's
        x = self.drop(token + (self.row_emb[row] + self.col_emb[col]))[:, None]  # (b, 1, d)
        for block, k_cache, v_cache, mod in zip(self.blocks, cache.k, cache.v, cache.mods):
            x = block.decode(x, k_cache, v_cache, pos, mod)
        cache.length = pos + 1
        cache.logits = self.head(self.ln_f(x[:, 0]))  # (b, k)


def _init_weights(module: nn.Module) -> None:
    """GPT-2 style: normal(0, 0.02) weights, zero biases; a class modulation starts at zero."""
    if isinstance(module, ClassModulation):
        module.reset_parameters()
    elif isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
