"""The one attention entry point of genai_jax, with several implementations behind it.

Layout everywhere: `[batch, seq, heads, head_dim]` (that of `jax.nn.dot_product_attention`).
Grouped-query attention when `k`/`v` have fewer heads than `q` (they must divide them).

Implementations: "xla" (portable: two einsums and a float32 softmax), "cudnn" (NVIDIA's fused
kernel through `jax.nn.dot_product_attention`), "pallas" (our own flash kernels in
`pallas_kernels`: `flash_attention` for training, `flash_decode` for the KV cache).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "pallas")


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
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
      implementation: "xla", "cudnn" (NVIDIA GPUs) or "pallas".

    Returns:
      `[batch, q_len, heads, head_dim]` in the dtype of `q`.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of "
                         f"{IMPLEMENTATIONS}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"kv heads ({k.shape[2]}) must divide query heads ({q.shape[2]})")
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
        visible = jnp.arange(k.shape[1])[None, None, :] <= query_pos[:, :, None]
        mask = visible[:, None] if mask is None else mask & visible[:, None]
    if implementation == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError("attention implementation 'cudnn' needs an NVIDIA GPU; this run is "
                             f"on {jax.default_backend()!r}: use model.attention='xla'")
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                            implementation="cudnn")
    return _xla_attention(q, k, v, causal=causal, mask=mask)


def _xla_attention(q, k, v, *, causal, mask):
    """Two batched matmuls and a float32 softmax.

    Grouped-query attention folds the query heads of each kv head into one axis so that K/V are
    never repeated in memory.
    """
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    qg = q.reshape(b, tq, kvh, g, d)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
    logits = logits * (d ** -0.5)
    if causal:
        mask_c = jnp.tril(jnp.ones((tq, tk), dtype=bool))
        logits = jnp.where(mask_c, logits, jnp.finfo(jnp.float32).min)
    if mask is not None:  # [b, 1, tq, tk]: the same for every head
        logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v)
    return out.reshape(b, tq, h, d).astype(q.dtype)
