"""Pure-jnp references for the kernels: they materialise [q_len, kv_len] and are obviously right.

Same masking semantics as the kernels (see pallas_kernels.flash_attention): causal aligned at
the end of the keys, segment ids, grouped K/V heads, and zeros for rows with no visible key.
`compute_dtype` sets the dtype of the matmuls (float32 by default; bfloat16 mimics a naive
bf16 attention, whose error is the yardstick for the kernels' bf16 error). Softmax is always
computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _split_segments(segment_ids):
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        return segment_ids[0], segment_ids[1]
    return segment_ids, segment_ids


def attention_mask(q_len: int, kv_len: int, *, causal: bool = False, q_segment_ids=None,
                   kv_segment_ids=None) -> jax.Array:
    """bool [batch or 1, 1, q_len, kv_len]: True where query i may attend key j."""
    mask = jnp.ones((1, 1, q_len, kv_len), bool)
    if causal:
        i = jnp.arange(q_len)[:, None]
        j = jnp.arange(kv_len)[None, :]
        mask = mask & (j <= i + (kv_len - q_len))[None, None]
    if q_segment_ids is not None:
        same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
        mask = mask & same[:, None]
    return mask


def masked_attention(q, k, v, mask, *, sm_scale: float | None = None,
                     compute_dtype=jnp.float32) -> jax.Array:
    """Attention with an explicit boolean mask [batch or 1, heads or 1, q_len, kv_len].

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim].
    Returns [batch, q_len, heads, head_dim] in q's dtype.
    """
    heads, kv_heads = q.shape[2], k.shape[2]
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    k = jnp.repeat(k, heads // kv_heads, axis=2)
    v = jnp.repeat(v, heads // kv_heads, axis=2)
    qc, kc, vc = (x.astype(compute_dtype) for x in (q, k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", qc, kc, preferred_element_type=compute_dtype,
                        precision="highest")
    logits = logits.astype(jnp.float32) * sm_scale
    logits = jnp.where(mask, logits, -jnp.inf)
    # Rows with no visible key: softmax of all -inf is NaN; define them as zeros instead.
    any_visible = jnp.any(mask, axis=-1, keepdims=True)
    probs = jax.nn.softmax(jnp.where(any_visible, logits, 0.0), axis=-1)
    probs = jnp.where(mask, probs, 0.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(compute_dtype), vc,
                     preferred_element_type=compute_dtype, precision="highest")
    return out.astype(q.dtype)


def attention(q, k, v, *, causal: bool = False, segment_ids=None,
              sm_scale: float | None = None, compute_dtype=jnp.float32) -> jax.Array:
    """Reference for pallas_kernels.flash_attention (same arguments, same layout)."""
    q_len, kv_len = q.shape[1], k.shape[1]
    q_seg, kv_seg = _split_segments(segment_ids)
    mask = attention_mask(q_len, kv_len, causal=causal, q_segment_ids=q_seg,
                          kv_segment_ids=kv_seg)
    return masked_attention(q, k, v, mask, sm_scale=sm_scale, compute_dtype=compute_dtype)


def decode(q, k_cache, v_cache, lengths, *, sm_scale: float | None = None,
           compute_dtype=jnp.float32) -> jax.Array:
    """Reference for pallas_kernels.flash_decode.

    q: [batch, q_len, heads, head_dim]; caches [batch, max_len, kv_heads, head_dim];
    lengths: [batch]. Query j sits at absolute position lengths - q_len + j and attends cache
    keys at positions <= that.
    """
    q_len, max_len = q.shape[1], k_cache.shape[1]
    pos = lengths[:, None] - q_len + jnp.arange(q_len)[None, :]  # [batch, q_len]
    mask = jnp.arange(max_len)[None, None, :] <= pos[:, :, None]  # [batch, q_len, max_len]
    return masked_attention(q, k_cache, v_cache, mask[:, None], sm_scale=sm_scale,
                            compute_dtype=compute_dtype)


def group_norm_modulate_silu(x, gamma, beta, scale, shift, *, groups: int,
                             eps: float = 1e-5) -> jax.Array:
    """Reference for pallas_kernels.group_norm_modulate_silu, in float32.

    x: [batch, height, width, channels]; gamma, beta: [channels]; scale, shift:
    [batch, channels]. Returns silu(groupnorm(x) * (1 + scale) + shift) in x's dtype.
    """
    batch, height, width, channels = x.shape
    xf = x.astype(jnp.float32).reshape(batch, height, width, groups, channels // groups)
    mean = jnp.mean(xf, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=(1, 2, 4), keepdims=True)
    normed = ((xf - mean) / jnp.sqrt(var + eps)).reshape(x.shape)
    y = normed * gamma.astype(jnp.float32) + beta.astype(jnp.float32)
    z = y * (1.0 + scale.astype(jnp.float32)[:, None, None, :])
    z = z + shift.astype(jnp.float32)[:, None, None, :]
    return jax.nn.silu(z).astype(x.dtype)


def sampler_step(x_t, model_output, noise, coeffs, *, parameterization: str,
                 clip_x0: bool = False, guidance_scale=None, uncond_output=None) -> jax.Array:
    """Reference for pallas_kernels.sampler_step: x_{t-1} from x_t and the network output.

    coeffs: a pallas_kernels.SamplerCoefficients whose fields are scalars or [batch].
    Arithmetic in float32; returns x_t's dtype.
    """
    f32 = jnp.float32

    def per_row(c):  # scalar or [batch] -> broadcastable against [batch, ...]
        c = jnp.asarray(c, f32)
        return c.reshape(c.shape + (1,) * (x_t.ndim - c.ndim))

    xt, out = x_t.astype(f32), model_output.astype(f32)
    if guidance_scale is not None:
        uncond = uncond_output.astype(f32)
        out = uncond + per_row(guidance_scale) * (out - uncond)
    a, s = per_row(coeffs.sqrt_alpha_bar), per_row(coeffs.sqrt_one_minus_alpha_bar)
    if parameterization == "eps":
        eps = out
        x0 = (xt - s * eps) / a
    elif parameterization == "x0":
        x0 = out
        eps = (xt - a * x0) / s
    elif parameterization == "v":
        x0 = a * xt - s * out
        eps = s * xt + a * out
    else:
        raise ValueError(f"unknown parameterization {parameterization!r}")
    if clip_x0:
        x0 = jnp.clip(x0, -1.0, 1.0)
        eps = (xt - a * x0) / s
    x_prev = (per_row(coeffs.coef_x0) * x0 + per_row(coeffs.coef_xt) * xt
              + per_row(coeffs.coef_eps) * eps)
    if noise is not None:
        x_prev = x_prev + per_row(coeffs.sigma) * noise.astype(f32)
    return x_prev.astype(x_t.dtype)
