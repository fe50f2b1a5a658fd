"""The one attention entry point of genai_jax, with several implementations behind it.

Layout everywhere: `[batch, seq, heads, head_dim]` (that of `jax.nn.dot_product_attention`).
Grouped-query attention when `k`/`v` have fewer heads than `q` (they must divide them).
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
    mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    implementation: str = "xla",
) -> jax.Array:
    """Scaled dot-product attention.

    Args:
      q: `[batch, q_len, heads, head_dim]`.
      k, v: `[batch, kv_len, kv_heads, head_dim]`, `heads % kv_heads == 0`.
      causal: query `i` sees keys `<= i` (queries and keys aligned at the start).
      mask: optional boolean `[batch, 1 or heads, q_len, kv_len]`, True = may attend. Used by
        the KV-cache decode path, where each row has its own positions.
      segment_ids: optional int `[batch, seq]` for packed sequences (self-attention only).
      implementation: "xla" (portable reference), "cudnn" (NVIDIA GPUs), or "pallas"
        (genai_jax's own flash kernels in `pallas_kernels`).

    Returns:
      `[batch, q_len, heads, head_dim]` in the dtype of `q`.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of "
                         f"{IMPLEMENTATIONS}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"kv heads ({k.shape[2]}) must divide query heads ({q.shape[2]})")
    if implementation == "pallas":
        return _pallas_attention(q, k, v, causal=causal, mask=mask, segment_ids=segment_ids)
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask = same[:, None] if mask is None else mask & same[:, None]
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(
            "attention implementation 'cudnn' needs an NVIDIA GPU; this run is on "
            f"{jax.default_backend()!r}: use model.attention='xla'"
        )
    if implementation == "xla":
        return _xla_attention(q, k, v, causal=causal, mask=mask)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                        implementation="cudnn")


def _xla_attention(q, k, v, *, causal, mask):
    """Reference attention as two batched matmuls; softmax in float32.

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
        allowed = jnp.tril(jnp.ones((tq, tk), dtype=bool))
        logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    if mask is not None:
        m = mask.reshape(mask.shape[0], -1, 1, tq, tk) if mask.shape[1] == 1 else mask.reshape(
            mask.shape[0], kvh, g, tq, tk)
        logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v)
    return out.reshape(b, tq, h, d).astype(q.dtype)


def _pallas_attention(q, k, v, *, causal, mask, segment_ids):
    try:
        import pallas_kernels
    except ImportError as e:  # pragma: no cover - pallas_kernels ships with genai_jax
        raise ValueError(f"attention implementation 'pallas' needs pallas_kernels: {e}") from e
    if not hasattr(pallas_kernels, "flash_attention"):
        raise ValueError("attention implementation 'pallas' is not available in this build: "
                         "pallas_kernels.flash_attention is missing; use model.attention='xla'")
    if mask is not None:
        raise ValueError("the pallas attention path takes causal and segment_ids masks, not an "
                         "arbitrary mask; the KV-cache decode path calls flash_decode instead")
    return pallas_kernels.flash_attention(q, k, v, causal=causal, segment_ids=segment_ids)
