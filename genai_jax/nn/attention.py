"""The one attention entry point of genai_jax, with several implementations behind it.

Layout everywhere: `[batch, seq, heads, head_dim]` (that of `jax.nn.dot_product_attention`).
Grouped-query attention when `k`/`v` have fewer heads than `q` (they must divide them).

Implementations: "xla" (portable: two einsums and a float32 softmax), "cudnn" (NVIDIA's fused
kernel through `jax.nn.dot_product_attention`), "pallas" (our own flash kernels in
`pallas_kernels`: `flash_attention` for training, `flash_decode` for the KV cache).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange
from jax.custom_derivatives import SymbolicZero

IMPLEMENTATIONS = ("xla", "cudnn", "pallas")


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    kv_heads_first: bool = False,
    implementation: str = "xla",
) -> jax.Array:
    """Scaled dot-product attention.

    Args:
      q: `[batch, q_len, heads, head_dim]`.
      k, v: `[batch, kv_len, kv_heads, head_dim]`, `heads % kv_heads == 0`.
      causal: self-attention mask, query `i` sees keys `<= i` (needs q_len == kv_len).
      segment_ids: optional int `[batch, seq]` for packed sequences (self-attention only).
      kv_lengths: KV-cache attention: int `[batch]`, the valid cache length of each row; the
        `q_len` queries are the last positions before it (query `j` sits at
        `kv_lengths - q_len + j`) and see the cache up to their own position.
      kv_heads_first: k, v are `[batch, kv_heads, kv_len, head_dim]` (a KV cache kept
        head-major, which the "xla" implementation reads without copying it: a token-major
        cache was copied into this layout at every decode step, most of a CPU step's time).
      implementation: "xla", "cudnn" (NVIDIA GPUs) or "pallas".

    Returns:
      `[batch, q_len, heads, head_dim]` in the dtype of `q`.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of "
                         f"{IMPLEMENTATIONS}")
    kv_heads, kv_len = (k.shape[1], k.shape[2]) if kv_heads_first else (k.shape[2], k.shape[1])
    if q.shape[2] % kv_heads:
        raise ValueError(f"kv heads ({kv_heads}) must divide query heads ({q.shape[2]})")
    if implementation != "xla" and kv_heads_first:  # the kernels take token-major k, v
        k, v = (rearrange(x, "b h k d -> b k h d") for x in (k, v))
    if implementation == "pallas":
        import pallas_kernels

        if kv_lengths is not None:
            return pallas_kernels.flash_decode(q, k, v, kv_lengths)
        return pallas_kernels.flash_attention(q, k, v, causal=causal, segment_ids=segment_ids)
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    if kv_lengths is not None:
        query_pos = kv_lengths[:, None] - q.shape[1] + jnp.arange(q.shape[1])  # [batch, q_len]
        visible = jnp.arange(kv_len)[None, None, :] <= query_pos[:, :, None]
        mask = visible[:, None] if mask is None else mask & visible[:, None]
    if implementation == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError("attention implementation 'cudnn' needs an NVIDIA GPU; this run is "
                             f"on {jax.default_backend()!r}: use model.attention='xla'")
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                            implementation="cudnn")
    return _xla_attention(q, k, v, causal=causal, mask=mask, kv_heads_first=kv_heads_first)


def _xla_attention(q, k, v, *, causal, mask, kv_heads_first=False):
    """Two batched matmuls and a float32 softmax (`_attend`) per block of queries.

    Layout inside: queries `[blocks, b, kv_heads, rows, d]`, the `group` query heads that share
    a kv head folded into the rows (`rows = block_len x group`), so that K/V are never repeated
    in memory and each block is one contiguous slice; keys and values `[b, kv_heads, k, d]`.
    The 1/sqrt(head_dim) scale is applied to q, not to the logits.
    """
    if kv_heads_first:  # a head-major cache: already the layout inside
        kh, vh = k, v
    else:
        kh, vh = (rearrange(x, "b k h d -> b h k d") for x in (k, v))
    g = q.shape[2] // kh.shape[1]
    n = _num_query_blocks(q.shape[1], kh.shape[2], causal)
    qb = rearrange(q * q.shape[-1] ** -0.5, "b (n s) (h g) d -> n b h (s g) d", n=n, g=g)
    if mask is not None:  # [b, 1, q_len, kv_len]: the same for every head
        mask = rearrange(jnp.repeat(mask, g, axis=2), "b o (n r) k -> n b o r k", n=n)
    out = _attend(qb, kh, vh, mask, causal, g)
    return rearrange(out, "n b h (s g) d -> b (n s) (h g) d", g=g).astype(q.dtype)


# Causal attention runs in up to MAX_QUERY_BLOCKS query blocks of at least MIN_QUERY_BLOCK rows:
# each block multiplies only the keys up to its last query, which skips (n - 1) / 2n of the
# logits for n blocks, and its logits stay in cache. Blocks of 64 rows were the fastest of
# 32-256 for a [8, 256, 8, 64] causal GQA forward and backward on 2 CPU cores (4 blocks: 2.3x
# faster than one block with autodiff's backward; 1.5x from the blocks alone).
MIN_QUERY_BLOCK, MAX_QUERY_BLOCKS = 64, 8


def _num_query_blocks(q_len: int, kv_len: int, causal: bool) -> int:
    """How many blocks the queries are split into (1 unless causal self-attention)."""
    n = min(MAX_QUERY_BLOCKS, q_len // MIN_QUERY_BLOCK)
    return n if causal and q_len == kv_len and n >= 2 and q_len % n == 0 else 1


def _block_keys(q, k, causal: bool, group: int) -> list[int]:
    """The keys each query block sees: with a causal mask, up to its last query."""
    n, rows = q.shape[0], q.shape[3] // group
    return [(i + 1) * rows if causal else k.shape[2] for i in range(n)]


def _attend_forward(q, k, v, mask, causal, group):
    """(output `[n, b, h, rows, d]`, float32 probabilities of each query block)."""
    outs, probs = [], []
    rows = q.shape[3] // group
    for i, keys in enumerate(_block_keys(q, k, causal, group)):
        logits = jnp.einsum("bhrd,bhkd->bhrk", q[i], k[:, :, :keys],
                            preferred_element_type=jnp.float32)
        keep = None
        if causal:  # row r holds query i * rows + r // group
            position = i * rows + jnp.arange(q.shape[3]) // group
            keep = position[:, None] >= jnp.arange(keys)[None, :]
        if mask is not None:
            keep = mask[i, ..., :keys] if keep is None else keep & mask[i, ..., :keys]
        if keep is not None:
            logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(logits, axis=-1)
        outs.append(jnp.einsum("bhrk,bhkd->bhrd", p.astype(v.dtype), v[:, :, :keys]))
        probs.append(p)
    return jnp.stack(outs), probs


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def _attend(q, k, v, mask, causal, group):
    """`softmax(q k^T, masked) v` for query blocks `q [n, b, h, rows, d]` (already scaled),
    `k, v [b, h, k, d]`, `mask` `[n, b, 1, rows, k]` or None.

    Its tangent is written so that its transpose, the backward pass, is the one flash attention
    uses: `dS = P * (dO V^T - rowsum(dO * O))`, the row sum over head_dim rather than autodiff's
    `rowsum(dP * P)` over every key (and no gradient of the scale or the mask over the logits).
    Forward mode and Hessian-vector products work as with autodiff (tests/test_forward_mode.py).
    """
    return _attend_forward(q, k, v, mask, causal, group)[0]


@functools.partial(_attend.defjvp, symbolic_zeros=True)
def _attend_jvp(causal, group, primals, tangents):
    q, k, v, mask = primals
    dq, dk, dv, _ = (None if isinstance(t, SymbolicZero) else t for t in tangents)
    out, probs = _attend_forward(q, k, v, mask, causal, group)
    douts = []
    for i, (keys, p) in enumerate(zip(_block_keys(q, k, causal, group), probs, strict=True)):
        terms = []
        if dq is not None or dk is not None:
            # dO = (P * dS) V - rowsum(P * dS) O, with dS the logits' tangent
            ds = [jnp.einsum("bhrd,bhkd->bhrk", a, b[:, :, :keys],
                             preferred_element_type=jnp.float32)
                  for a, b in ((None if dq is None else dq[i], k), (q[i], dk))
                  if a is not None and b is not None]
            pds = p * functools.reduce(jnp.add, ds)
            terms.append(jnp.einsum("bhrk,bhkd->bhrd", pds.astype(v.dtype), v[:, :, :keys])
                         - (pds.sum(-1, keepdims=True) * out[i].astype(jnp.float32)
                            ).astype(v.dtype))
        if dv is not None:
            terms.append(jnp.einsum("bhrk,bhkd->bhrd", p.astype(v.dtype), dv[:, :, :keys]))
        douts.append(functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(out[i]))
    return out, jnp.stack(douts)
