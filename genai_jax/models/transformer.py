"""Decoder-only transformer language model (GPT), as a Flax NNX module.

Pre-norm blocks `x + attn(norm(x))`, `x + mlp(norm(x))`; LayerNorm or RMSNorm; learned or rotary
positions (with a base `rope_theta` and linear or Llama-3 frequency scaling); GELU (exact or tanh),
or SwiGLU MLP; multi-head or grouped-query attention through `genai_jax.nn.dot_product_attention`;
biases everywhere, nowhere, or on q/k/v only (Qwen2); optional weight tying; dropout; parameters
kept in `param_dtype` and cast to `dtype` for compute (bf16 compute over fp32 parameters works).
These options cover GPT-2, Llama, Mistral and Qwen2 checkpoints (`genai_jax.interop`).

The KV cache is an explicit argument and result (a list of `{"k", "v"}` arrays per layer), so
decoding stays a pure function of pytrees.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from genai_jax.nn import (
    MLP,
    Dense,
    Embed,
    LayerNorm,
    LoRA,
    dot_product_attention,
    lookup,
    param,
    rematerialized,
    rope_frequencies,
    rotary,
)
from genai_jax.parallel import constrain

# Activations: the batch over the data-parallel axes; heads, the MLP hidden layer and the
# vocabulary over `tensor`; the residual stream replicated within a tensor-parallel group.
RESIDUAL, HEADS, LOGITS = ("batch", None, None), ("batch", None, "heads", None), (
    "batch", None, "vocab")

Cache = list[dict[str, jax.Array]]

# The projections a LoRA adapter can target (`model.lora.targets`).
ATTENTION_PROJECTIONS, MLP_PROJECTIONS = ("q", "k", "v", "out"), ("gate", "up", "down")
LORA_TARGETS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    block_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 0  # 0: same as num_heads (multi-head attention)
    embed_dim: int = 128
    mlp_ratio: float = 4.0
    mlp: str = "gelu"  # gelu | gelu_tanh | swiglu
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    position: str = "learned"  # learned | rotary
    rope_theta: float = 10_000.0
    rope_scaling: str = "none"  # none | linear | llama3 (`genai_jax.nn.rope_frequencies`)
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    head_dim: int = 0  # 0: embed_dim // num_heads
    mlp_dim: int = 0  # 0: int(mlp_ratio * embed_dim)
    use_bias: bool = True
    qkv_bias: bool = False  # biases on the q/k/v projections even when use_bias is False
    tie_embeddings: bool = True
    dropout: float = 0.0
    attention: str = "xla"  # xla | cudnn | pallas
    remat: str = "none"  # none | full | dots (nn.REMAT_POLICIES), per block in training
    dtype: str = "float32"
    param_dtype: str = "float32"
    lora: LoRA | None = None  # a low-rank adapter on the projections named in lora_targets
    lora_targets: tuple[str, ...] = ()  # of LORA_TARGETS

    def __post_init__(self):
        # The derived sizes, filled in once so that every reader sees the same numbers.
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.embed_dim // self.num_heads)
        if not self.mlp_dim:
            object.__setattr__(self, "mlp_dim", int(self.mlp_ratio * self.embed_dim))

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    def rope_frequencies(self) -> tuple[float, ...]:
        return rope_frequencies(self.head_dim, self.rope_theta, self.rope_scaling,
                                factor=self.rope_factor,
                                low_freq_factor=self.rope_low_freq_factor,
                                high_freq_factor=self.rope_high_freq_factor,
                                original_context=self.rope_original_context)


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        d, h, kvh, hd = cfg.embed_dim, cfg.num_heads, cfg.kv_heads, cfg.head_dim
        qkv = dict(axes=("embed", "heads", "kv"), use_bias=cfg.use_bias or cfg.qkv_bias)
        adapt = lambda name: cfg.lora if name in cfg.lora_targets else None
        self.cfg = cfg
        self.q = Dense([d], [h, hd], lora=adapt("q"), **qkv, **kw)
        self.k = Dense([d], [kvh, hd], lora=adapt("k"), **qkv, **kw)
        self.v = Dense([d], [kvh, hd], lora=adapt("v"), **qkv, **kw)
        # GPT-2: residual projections scaled by 1/sqrt(2 * layers).
        self.out = Dense([h, hd], [d], axes=("heads", "kv", "embed"), use_bias=cfg.use_bias,
                         stddev=0.02 / math.sqrt(2 * cfg.num_layers), lora=adapt("out"), **kw)

    def __call__(self, x: jax.Array, positions: jax.Array | None,
                 cache: dict[str, jax.Array] | None = None,
                 segment_ids: jax.Array | None = None, rng: jax.Array | None = None):
        """x: `[batch, seq, embed]`; positions and segment_ids (packed examples, no cache):
        `[batch, seq]` (positions None: `0..seq-1` in every row, no cache); rng: the adapters'
        dropout key. Returns (y, updated cache)."""
        keys = [None] * 4 if rng is None else list(jax.random.split(rng, 4))
        q, k, v = (constrain(f(x, r), HEADS) for f, r in zip((self.q, self.k, self.v), keys,
                                                              strict=False))
        if self.cfg.position == "rotary":
            freqs = self.cfg.rope_frequencies()
            q, k = rotary(q, positions, freqs), rotary(k, positions, freqs)
        if cache is None:
            y = dot_product_attention(q, k, v, causal=True, segment_ids=segment_ids,
                                      implementation=self.cfg.attention)
            return self.out(constrain(y, HEADS), keys[3]), None
        # Write this chunk's keys/values at each row's own position; each row then attends to
        # its cache up to the query's position (later slots hold stale or no data). The cache
        # is head-major (`init_cache`), so decoding reads it as it lies.
        write = jax.vmap(lambda c, u, s: jax.lax.dynamic_update_slice(c, u, (0, s, 0)))
        start = positions[:, 0]
        cache = {name: write(cache[name], rearrange(x, "b s h d -> b h s d").astype(
            cache[name].dtype), start) for name, x in (("k", k), ("v", v))}
        y = dot_product_attention(q, cache["k"].astype(q.dtype), cache["v"].astype(q.dtype),
                                  kv_lengths=positions[:, -1] + 1, kv_heads_first=True,
                                  implementation=self.cfg.attention)
        return self.out(y), cache


class Block(nnx.Module):
    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        norm = dict(rms=cfg.norm == "rmsnorm", use_bias=cfg.use_bias, eps=cfg.norm_eps,
                    dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        self.dropout = cfg.dropout
        self.lora_dropout = cfg.lora.dropout if cfg.lora is not None else 0.0
        self.norm1 = LayerNorm(cfg.embed_dim, **norm)
        self.attn = Attention(cfg, rngs=rngs)
        self.norm2 = LayerNorm(cfg.embed_dim, **norm)
        self.mlp = MLP(cfg.embed_dim, cfg.mlp_dim, kind=cfg.mlp, use_bias=cfg.use_bias,
                       out_stddev=0.02 / math.sqrt(2 * cfg.num_layers), lora=cfg.lora,
                       lora_targets=cfg.lora_targets,
                       dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                       rngs=rngs)

    def __call__(self, x, positions, cache=None, rng=None, segment_ids=None):
        r1, r2, r3, r4 = jax.random.split(rng, 4) if rng is not None else (None,) * 4
        if self.lora_dropout == 0:  # the adapters' dropout keys, only when they drop out
            r3 = r4 = None
        y, cache = self.attn(self.norm1(x), positions, cache, segment_ids, r3)
        x = constrain(x + _dropout(y, self.dropout, r1), RESIDUAL)
        x = constrain(x + _dropout(self.mlp(self.norm2(x), r4), self.dropout, r2), RESIDUAL)
        return x, cache


class Transformer(nnx.Module):
    """GPT: token (+ learned position) embedding, `num_layers` blocks, final norm, LM head."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.embed_dim, dtype=dtype, param_dtype=pdtype,
                           rngs=rngs)
        self.pos_embed = (param(rngs, nnx.initializers.normal(0.02),
                                (cfg.block_size, cfg.embed_dim), (None, "embed"), pdtype)
                          if cfg.position == "learned" else None)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = LayerNorm(cfg.embed_dim, rms=cfg.norm == "rmsnorm", use_bias=cfg.use_bias,
                              eps=cfg.norm_eps, dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.head = (None if cfg.tie_embeddings else
                     Dense([cfg.embed_dim], [cfg.vocab_size], axes=("embed", "vocab"),
                           use_bias=False, dtype=dtype, param_dtype=pdtype, rngs=rngs))

    def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, cache: Cache | None = None,
                 rng: jax.Array | None = None):
        """Next-token logits.

        Args:
          tokens: int `[batch, seq]`.
          positions: int `[batch, seq]`; defaults to `0..seq-1` for every row.
          segment_ids: int `[batch, seq]` of packed examples (attention stays within each);
            positions should then restart at each example. Not with a cache.
          cache: per-layer `{"k", "v"}` of `[batch, kv_heads, max_len, head_dim]`, or None.
          rng: dropout key; None means deterministic (evaluation, sampling).

        Returns:
          (logits `[batch, seq, vocab]` in float32, updated cache or None).
        """
        # Given positions reach the blocks; the default reaches them as None, so that rotary
        # embeddings use a constant table (`nn.rotary`).
        default = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if positions is None and cache is not None:
            positions = default
        x = self.embed(tokens)
        if self.pos_embed is not None:
            table_positions = default if positions is None else positions
            x = x + lookup(self.pos_embed[...], table_positions, (None, "embed")).astype(x.dtype)
        rngs = [None] * (len(self.blocks) + 1) if rng is None else list(
            jax.random.split(rng, len(self.blocks) + 1))
        x = constrain(_dropout(x, self.cfg.dropout, rngs[-1]), RESIDUAL)
        run_block = rematerialized(lambda blk, x, pos, r, seg: blk(x, pos, None, r, seg),
                                   self.cfg.remat)
        new_cache = []
        for i, block in enumerate(self.blocks):
            if cache is None:
                x, layer_cache = run_block(block, x, positions, rngs[i], segment_ids)
            else:
                x, layer_cache = block(x, positions, cache[i], rngs[i])
            new_cache.append(layer_cache)
        x = self.norm(x)
        logits = self.embed.attend(x) if self.head is None else self.head(x)
        return constrain(logits.astype(jnp.float32), LOGITS), (
            None if cache is None else new_cache)



def init_cache(cfg: TransformerConfig, batch: int, max_len: int) -> Cache:
    """An empty KV cache for `batch` rows of up to `max_len` positions, per layer `{"k", "v"}`
    `[batch, kv_heads, max_len, head_dim]` (head-major: see `Attention`)."""
    shape, dtype = (batch, cfg.kv_heads, max_len, cfg.head_dim), jnp.dtype(cfg.dtype)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
            for _ in range(cfg.num_layers)]
