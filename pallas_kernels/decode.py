"""Flash decoding: a few new queries per sequence attending to a KV cache of valid `lengths`.

All query heads that share a K/V head, and all new query positions, are stacked into the rows
of one [group * q_len, head_dim] tile, so each cache block is read once per K/V head and the
matmuls have more than q_len rows. Cache blocks past a row's length are never computed; on
TPU their index map repeats the last valid block, so they are not even copied. Forward only.

Two variants, as for flash attention (see pallas_kernels.backends):
- GPU-style ("interpret", "triton"): a program per (batch, kv_head), looping over cache blocks
  up to the row's length. The cache stays in its [batch, max_len, kv_heads, head_dim] layout.
- TPU-style ("tpu", "tpu_interpret"): grid (batch, cache block) with the lengths prefetched
  into SMEM; each block holds every K/V head, [block_kv, kv_heads, head_dim], whose last two
  dims are full and so satisfy TPU tiling without transposing the cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _blocks, backends

_DEFAULT_BLOCK_KV = {"interpret": 128, "triton": 64, "tpu": 512, "tpu_interpret": 512}


def _row_mask(length, q_len: int, rows: int, kv_start, block_kv: int):
    """bool [rows, block_kv]: row r (query position r % q_len) sees keys <= its position."""
    r = lax.broadcasted_iota(jnp.int32, (rows, block_kv), 0)
    col = kv_start + lax.broadcasted_iota(jnp.int32, (rows, block_kv), 1)
    return col <= length - q_len + r % q_len


def _gpu_kernel(lengths_ref, q_ref, k_ref, v_ref, o_ref, *, q_len, block_kv, sm_scale):
    length = lengths_ref[pl.program_id(0)]
    q = q_ref[...]  # [rows, D]
    rows, prec = q.shape[0], _blocks.precision_for(q.dtype)

    def body(j, carry):
        start = pl.multiple_of(j * block_kv, block_kv)
        k = k_ref[pl.ds(start, block_kv), :]
        v = v_ref[pl.ds(start, block_kv), :]
        mask = _row_mask(length, q_len, rows, start, block_kv)
        s = _blocks.scores(q, k, sm_scale, mask, prec)
        return _blocks.online_softmax_step(s, mask, v, *carry, prec)

    n_blocks = jnp.clip(pl.cdiv(length, block_kv), 0, k_ref.shape[0] // block_kv)
    m, row_sum, acc = lax.fori_loop(0, n_blocks, body, _blocks.init_stats(rows, q.shape[-1]))
    o_ref[...] = _blocks.finalize(m, row_sum, acc, o_ref.dtype)[0]


def _gpu_call(q, k_cache, v_cache, lengths, *, q_len, block_kv, sm_scale, backend):
    batch, kv_heads, rows, head_dim = q.shape
    max_len = k_cache.shape[1]
    q_spec = pl.BlockSpec((None, None, rows, head_dim), lambda b, h: (b, h, 0, 0))
    kv_spec = pl.BlockSpec((None, max_len, None, head_dim), lambda b, h: (b, 0, h, 0))
    return pl.pallas_call(
        functools.partial(_gpu_kernel, q_len=q_len, block_kv=block_kv, sm_scale=sm_scale),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(batch, kv_heads),
        in_specs=[pl.BlockSpec(), q_spec, kv_spec, kv_spec],
        out_specs=q_spec,
        interpret=backends.interpret_arg(backend),
        compiler_params=backends.compiler_params(backend, num_warps=4, num_stages=2),
        name="flash_decode",
    )(lengths, q, k_cache, v_cache)


def _num_blocks(length, block_kv: int, total: int):
    return jnp.clip(pl.cdiv(length, block_kv), 0, total)


def _tpu_kernel(lengths_ref, q_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc_sc, *, q_len,
                block_kv, sm_scale):
    b, j = pl.program_id(0), pl.program_id(1)
    length = lengths_ref[b]
    kv_heads, rows, head_dim = q_ref.shape

    @pl.when(j == 0)
    def _init():
        for h in range(kv_heads):
            m_sc[h], l_sc[h], acc_sc[h] = _blocks.init_stats(rows, head_dim)

    @pl.when(j < _num_blocks(length, block_kv, pl.num_programs(1)))
    def _step():
        mask = _row_mask(length, q_len, rows, j * block_kv, block_kv)
        for h in range(kv_heads):  # kv_heads is small (GQA); unrolled
            q, k, v = q_ref[h], k_ref[:, h, :], v_ref[:, h, :]
            prec = _blocks.precision_for(q.dtype)
            s = _blocks.scores(q, k, sm_scale, mask, prec)
            m_sc[h], l_sc[h], acc_sc[h] = _blocks.online_softmax_step(
                s, mask, v, m_sc[h], l_sc[h], acc_sc[h], prec)

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        for h in range(kv_heads):
            o_ref[h] = _blocks.finalize(m_sc[h], l_sc[h], acc_sc[h], o_ref.dtype)[0]


def _tpu_call(q, k_cache, v_cache, lengths, *, q_len, block_kv, sm_scale, backend):
    batch, kv_heads, rows, head_dim = q.shape
    max_len = k_cache.shape[1]
    n_blocks = max_len // block_kv

    def kv_index(b, j, lengths_ref):  # past the length: repeat the last block, no DMA
        last = jnp.maximum(_num_blocks(lengths_ref[b], block_kv, n_blocks) - 1, 0)
        return (b, jnp.minimum(j, last), 0, 0)

    q_block = (None, kv_heads, rows, head_dim)
    kv_block = (None, block_kv, kv_heads, head_dim)
    backends.check_tpu_tiling("q", q_block, q.shape)
    backends.check_tpu_tiling("k_cache/v_cache", kv_block, k_cache.shape)
    q_spec = pl.BlockSpec(q_block, lambda b, j, lengths_ref: (b, 0, 0, 0))
    kv_spec = pl.BlockSpec(kv_block, kv_index)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(batch, n_blocks),
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((kv_heads, rows, 1), jnp.float32),
                        pltpu.VMEM((kv_heads, rows, 1), jnp.float32),
                        pltpu.VMEM((kv_heads, rows, head_dim), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_tpu_kernel, q_len=q_len, block_kv=block_kv, sm_scale=sm_scale),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid_spec=grid_spec,
        interpret=backends.interpret_arg(backend),
        compiler_params=backends.compiler_params(
            backend, dimension_semantics=("parallel", "arbitrary")),
        name="flash_decode_tpu",
    )(lengths, q, k_cache, v_cache)


def flash_decode(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    sm_scale: float | None = None,
    block_kv: int | None = None,
    backend: str | None = None,
) -> jax.Array:
    """Attention of new queries over a KV cache (forward only).

    Args:
      q: [batch, q_len, heads, head_dim], q_len small (1..8 typical).
      k_cache, v_cache: [batch, max_len, kv_heads, head_dim]; kv_heads divides heads.
      lengths: int32 [batch], valid cache entries per row, the new queries' keys included.
        Query j sits at absolute position lengths - q_len + j and attends cache positions
        <= that position; a query with no visible key (lengths < q_len - j) outputs zeros.
      sm_scale: logit scale, default 1 / sqrt(head_dim).
      block_kv: cache positions per block; default per backend. If max_len is not a
        multiple of it, the cache is padded (copied), so prefer a multiple.
      backend: None (by platform), "interpret", "triton", "tpu" or "tpu_interpret".

    Returns:
      [batch, q_len, heads, head_dim] in q's dtype.
    """
    backend = backends.resolve_backend(backend)
    batch, q_len, heads, head_dim = q.shape
    max_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != batch or (
            k_cache.shape[3] != head_dim) or heads % kv_heads:
        raise ValueError(f"incompatible q {q.shape} and caches {k_cache.shape}, "
                         f"{v_cache.shape}: need [batch, max_len, kv_heads | heads, head_dim].")
    if sm_scale is None:
        sm_scale = head_dim**-0.5
    group = heads // kv_heads
    rows = group * q_len
    tpu_style = backends.is_tpu_style(backend)
    if backend == "triton":  # power-of-two tiles, >= 16 rows for tl.dot
        rows_p = max(16, 1 << (rows - 1).bit_length())
        d_p = max(16, 1 << (head_dim - 1).bit_length())
    else:
        rows_p, d_p = (-(-rows // 8) * 8 if tpu_style else rows), head_dim
    block_kv = block_kv or _DEFAULT_BLOCK_KV[backend]
    block_kv = min(block_kv, -(-max_len // 8) * 8)
    len_p = -(-max_len // block_kv) * block_kv

    # [B, T, H, D] -> [B, Hkv, group * T, D]: rows of one K/V head's queries, (g, t) order.
    qr = q.reshape(batch, q_len, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    qr = qr.reshape(batch, kv_heads, rows, head_dim)
    qr = jnp.pad(qr, [(0, 0), (0, 0), (0, rows_p - rows), (0, d_p - head_dim)])
    pad_cache = [(0, 0), (0, len_p - max_len), (0, 0), (0, d_p - head_dim)]
    if pad_cache != [(0, 0)] * 4:
        k_cache, v_cache = jnp.pad(k_cache, pad_cache), jnp.pad(v_cache, pad_cache)
    call = _tpu_call if tpu_style else _gpu_call
    out = call(qr, k_cache, v_cache, jnp.asarray(lengths, jnp.int32), q_len=q_len,
               block_kv=block_kv, sm_scale=float(sm_scale), backend=backend)
    out = out[:, :, :rows, :head_dim].reshape(batch, kv_heads, group, q_len, head_dim)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, head_dim)
