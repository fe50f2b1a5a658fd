"""Flash attention: the public entry point, its custom VJP, padding and backend dispatch.

Forward: online softmax over key blocks, never materialising [q_seq, kv_seq]; it saves the
per-row log-sum-exp. Backward: two Pallas kernels recompute probabilities from that lse, one
for dK/dV (a program per key block, looping over query blocks and over the query heads that
share the K/V head) and one for dQ (a program per query block, looping over key blocks), with
delta = rowsum(dO * O) precomputed.

Masking semantics (shared with pallas_kernels.reference):
- causal: query i may attend key j <= i + (kv_len - q_len), i.e. the diagonal is aligned at
  the END of the keys; for q_len == kv_len this is the usual j <= i. Key blocks that are
  fully masked are skipped.
- segment_ids: query i may attend key j only if their segment ids are equal.
- A query row that may attend no key at all outputs zeros (and gets zero gradients).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import _autodiff, _blocks, _gpu_kernels, _tpu_kernels, backends
from pallas_kernels.config import BlockSizes, KernelConfig, padded_lengths, resolve_block_sizes

_REFUSAL = _autodiff.refusal(
    "pallas_kernels.flash_attention",
    "the XLA attention (genai_jax: model.attention='xla'; or pallas_kernels.reference.attention)")


class SegmentIds(NamedTuple):
    """Segment ids of packed sequences: q [batch, q_len] and kv [batch, kv_len], int32."""

    q: jax.Array
    kv: jax.Array


def normalize_segment_ids(segment_ids, q_len: int, kv_len: int) -> SegmentIds | None:
    """Accepts None, one [batch, seq] array (when q_len == kv_len) or a (q, kv) pair."""
    if segment_ids is None:
        return None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError("segment_ids must be one array or a (q_segment_ids, "
                             f"kv_segment_ids) pair; got a sequence of {len(segment_ids)}.")
        q_seg, kv_seg = segment_ids
    else:
        if q_len != kv_len:
            raise ValueError(f"a single segment_ids array needs q_len == kv_len, got {q_len} "
                             f"and {kv_len}; pass a (q_segment_ids, kv_segment_ids) pair.")
        q_seg = kv_seg = segment_ids
    q_seg, kv_seg = jnp.asarray(q_seg, jnp.int32), jnp.asarray(kv_seg, jnp.int32)
    if q_seg.ndim != 2 or q_seg.shape[1] != q_len or kv_seg.ndim != 2 or kv_seg.shape[1] != kv_len:
        raise ValueError(f"segment ids must be [batch, {q_len}] and [batch, {kv_len}], got "
                         f"{q_seg.shape} and {kv_seg.shape}.")
    return SegmentIds(q_seg, kv_seg)


def _check_shapes(q, k, v) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("q, k, v must be [batch, seq, heads, head_dim]; got "
                         f"{q.shape}, {k.shape}, {v.shape}.")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}.")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} differ in batch or head_dim.")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"K/V heads ({k.shape[2]}) must divide query heads ({q.shape[2]}).")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | SegmentIds | tuple[jax.Array, jax.Array] | None = None,
    sm_scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
) -> jax.Array:
    """Memory-efficient exact attention, differentiable through Pallas backward kernels.

    Args:
      q: [batch, q_len, heads, head_dim].
      k, v: [batch, kv_len, kv_heads, head_dim]; kv_heads divides heads (GQA / MQA).
      causal: mask keys after each query, aligned at the end (query i sees keys
        j <= i + kv_len - q_len).
      segment_ids: None, one int [batch, seq] array (q_len == kv_len), or a pair / SegmentIds
        of q [batch, q_len] and kv [batch, kv_len]; tokens attend within equal ids only.
      sm_scale: logit scale, default 1 / sqrt(head_dim).
      block_sizes: tile sizes; None fields take the backend's defaults.
      backend: None (by platform), "interpret", "triton", "tpu" or "tpu_interpret".

    Returns:
      [batch, q_len, heads, head_dim] in q's dtype (accumulated in float32).
    """
    _check_shapes(q, k, v)
    backend = backends.resolve_backend(backend)
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    segs = normalize_segment_ids(segment_ids, q_len, kv_len)
    if sm_scale is None:
        sm_scale = head_dim**-0.5
    blocks = resolve_block_sizes(block_sizes, backend, q_len, kv_len)
    q_pad, kv_pad = padded_lengths(blocks, q_len, kv_len)
    cfg = KernelConfig(
        backend=backend,
        mask=_blocks.MaskInfo(causal=causal, q_len=q_len, kv_len=kv_len,
                              kv_padded=kv_pad != kv_len, has_segments=segs is not None),
        sm_scale=float(sm_scale),
        blocks=blocks,
        num_heads=heads,
        num_kv_heads=kv_heads,
    )

    def pad_seq(x, length):
        return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))

    # Triton tiles must be powers of two: zero-padding head_dim changes no logit, and the
    # padded output columns are sliced off.
    d_pad = head_dim
    if backend == "triton":
        d_pad = max(16, 1 << (head_dim - 1).bit_length())

    def pad_dim(x):
        return jnp.pad(x, [(0, 0)] * 3 + [(0, d_pad - head_dim)])

    qp, kp, vp = (pad_dim(pad_seq(x, n)) for x, n in ((q, q_pad), (k, kv_pad), (v, kv_pad)))
    if segs is None:
        q_seg = kv_seg = None
    else:
        # The padding's ids do not matter: padded keys are masked by position and padded
        # query rows are sliced off.
        q_seg, kv_seg = pad_seq(segs.q, q_pad), pad_seq(segs.kv, kv_pad)
    out = _autodiff.call_custom_vjp(_REFUSAL, _flash, cfg, qp, kp, vp, q_seg, kv_seg)
    return out[:, :q_len, :, :head_dim]


def _kernels(cfg: KernelConfig):
    return _tpu_kernels if backends.is_tpu_style(cfg.backend) else _gpu_kernels


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, q_seg, kv_seg):
    out, _ = _kernels(cfg).forward(cfg, q, k, v, q_seg, kv_seg)
    return out


def _flash_fwd(cfg, q, k, v, q_seg, kv_seg):
    out, lse = _autodiff.reverse_mode_only(_REFUSAL, functools.partial(_kernels(cfg).forward, cfg),
                                           q, k, v, q_seg, kv_seg)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(cfg, residuals, do):
    q, k, v, q_seg, kv_seg, out, lse = residuals
    dq, dk, dv = _autodiff.reverse_mode_only(
        _REFUSAL, functools.partial(_kernels(cfg).backward, cfg), q, k, v, q_seg, kv_seg, out,
        lse, do)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
