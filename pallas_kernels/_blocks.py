"""Math on one (query block, key block) tile, shared by the GPU-style and TPU-style kernels.

Everything here works on values already loaded from refs: q [block_q, head_dim],
k and v [block_kv, head_dim], per-row statistics as [block_q, 1] columns (kept 2-D because
TPU vector layouts are 2-D). Scores and statistics are float32 whatever the input dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# A large finite negative instead of -inf: max/exp of fully masked rows then stay NaN-free.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class MaskInfo:
    """Static facts that decide which (query, key) pairs may attend.

    Query i (0-based, unpadded) may attend key j when j < kv_len, when causal and
    j <= i + kv_len - q_len (the causal diagonal is aligned at the end of the keys, as for
    a KV cache), and when the segment ids of i and j are equal.
    """

    causal: bool
    q_len: int
    kv_len: int
    kv_padded: bool  # the key axis was padded, so keys >= kv_len must be masked
    has_segments: bool

    @property
    def offset(self) -> int:
        return self.kv_len - self.q_len


def dot(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False,
        precision=None) -> jax.Array:
    """a @ b with float32 accumulation, optionally transposing an operand (both 2-D)."""
    contract = ((0 if trans_a else 1,), (1 if trans_b else 0,))
    return lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def precision_for(dtype) -> lax.Precision:
    # float32 inputs get full-precision matmuls (no TF32 on GPU) so that the kernel is as
    # accurate as an XLA float32 attention; bf16 inputs use the native bf16 MXU/tensor cores.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def block_mask(info: MaskInfo, q_start, kv_start, block_q: int, block_kv: int,
               q_seg=None, kv_seg=None):
    """bool [block_q, block_kv] of allowed pairs, or None when every pair is allowed.

    q_seg: [block_q, 1] int32, kv_seg: [1, block_kv] int32 (used when info.has_segments).
    """
    mask = None

    def conj(a, b):
        return b if a is None else jnp.logical_and(a, b)

    if info.kv_padded or info.causal:
        cols = kv_start + lax.broadcasted_iota(jnp.int32, (block_q, block_kv), 1)
        if info.kv_padded:
            mask = conj(mask, cols < info.kv_len)
        if info.causal:
            rows = q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_kv), 0)
            mask = conj(mask, cols <= rows + info.offset)
    if info.has_segments:
        mask = conj(mask, q_seg == kv_seg)
    return mask


def scores(q, k, sm_scale: float, mask, precision):
    """Scaled, masked logits, float32 [block_q, block_kv]."""
    s = dot(q, k, trans_b=True, precision=precision) * sm_scale
    return s if mask is None else jnp.where(mask, s, MASK_VALUE)


def online_softmax_step(s, mask, v, m, row_sum, acc, precision):
    """Folds one key block into the running (max m, normaliser row_sum, accumulator acc).

    s: [block_q, block_kv] f32 logits; v: [block_kv, head_dim];
    m, row_sum: [block_q, 1] f32; acc: [block_q, head_dim] f32.
    """
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new)
    if mask is not None:
        # Without this a row with no allowed key so far would count masked keys as weight 1.
        p = jnp.where(mask, p, 0.0)
    row_sum_new = alpha * row_sum + jnp.sum(p, axis=1, keepdims=True)
    acc_new = alpha * acc + dot(p.astype(v.dtype), v, precision=precision)
    return m_new, row_sum_new, acc_new


def finalize(m, row_sum, acc, out_dtype):
    """Output [block_q, head_dim] and log-sum-exp [block_q, 1] of the finished rows.

    Rows with no allowed key output 0 and get lse = +inf, so that the backward pass's
    exp(s - lse) is exactly 0 for them.
    """
    empty = row_sum == 0.0
    safe_sum = jnp.where(empty, 1.0, row_sum)
    out = (acc / safe_sum).astype(out_dtype)
    lse = jnp.where(empty, jnp.inf, m + jnp.log(safe_sum))
    return out, lse


def init_stats(block_q: int, head_dim: int):
    """Initial (m, row_sum, acc) for a query block."""
    m = jnp.full((block_q, 1), MASK_VALUE, jnp.float32)
    row_sum = jnp.zeros((block_q, 1), jnp.float32)
    acc = jnp.zeros((block_q, head_dim), jnp.float32)
    return m, row_sum, acc


def backward_tile(q, k, v, do, lse, delta, mask, sm_scale: float, precision):
    """Recomputes probabilities of one tile and returns (p, ds) for the gradient matmuls.

    p = softmax probabilities [block_q, block_kv] (from the saved lse); ds = dL/d(logits)
    = p * (dO v^T - delta), with delta = rowsum(dO * O) [block_q, 1].
    """
    s = scores(q, k, sm_scale, mask, precision)
    p = jnp.exp(s - lse)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    dp = dot(do, v, trans_b=True, precision=precision)
    ds = p * (dp - delta)
    return p, ds
