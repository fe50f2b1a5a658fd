"""TPU-style flash-attention kernels: the reduction axis is the last (sequential) grid axis.

Used by the "tpu" backend (Mosaic TPU) and "tpu_interpret" (Pallas' TPU interpreter on CPU).
Pallas pipelines each grid step's blocks from HBM into VMEM, so a kernel sees one
(query block, key block) tile per step and carries its running statistics in VMEM scratch
across the sequential last axis. For fully masked causal tiles the index maps repeat the
previous block index, so no DMA is issued, and pl.when skips the compute.

Layout: [batch, heads, seq, head_dim] (transposed from the caller's layout), so every block's
last two dims are (seq_block, head_dim), as TPU's (8, 128) tiling needs. Per-row statistics are
[batch, heads, q_seq, 1]; segment ids are [batch, q_seq, 1] and [batch, 1, kv_seq], so that the
mask is a broadcast compare of a column against a row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _blocks, backends
from pallas_kernels.config import KernelConfig

_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


def _spec(name: str, block_shape, index_map, array_shape) -> pl.BlockSpec:
    backends.check_tpu_tiling(name, block_shape, array_shape)
    return pl.BlockSpec(block_shape, index_map)


def _num_kv_blocks(cfg: KernelConfig, qi, block_q: int, block_kv: int):
    """Key blocks visible to query block qi (the rest are fully masked)."""
    n = pl.cdiv(cfg.mask.kv_len, block_kv)
    if cfg.mask.causal:
        last_key = (qi + 1) * block_q - 1 + cfg.mask.offset
        n = jnp.clip((last_key + block_kv) // block_kv, 0, n)
    return n


def _q_block_range(cfg: KernelConfig, ki, block_q: int, block_kv: int):
    """[lo, hi) of query blocks that see key block ki (rows >= q_len carry dO = 0)."""
    hi = pl.cdiv(cfg.mask.q_len, block_q)
    lo = 0
    if cfg.mask.causal:
        lo = jnp.clip((ki * block_kv - cfg.mask.offset) // block_q, 0, hi)
    return lo, hi


def _to_bhsd(x):
    return jnp.swapaxes(x, 1, 2)


def _segment_inputs(cfg, q_seg, kv_seg):
    if not cfg.mask.has_segments:
        return []
    return [q_seg[:, :, None], kv_seg[:, None, :]]


def _segment_specs(cfg, batch, q_seq, kv_seq, bq, bkv, q_index, kv_index):
    if not cfg.mask.has_segments:
        return []
    return [_spec("q_segment_ids", (None, bq, 1), q_index, (batch, q_seq, 1)),
            _spec("kv_segment_ids", (None, 1, bkv), kv_index, (batch, 1, kv_seq))]


def _split(refs, cfg, n_in):
    ins, rest = list(refs[:n_in]), list(refs[n_in:])
    if cfg.mask.has_segments:
        return ins, rest[0][...], rest[1][...], rest[2:]
    return ins, None, None, rest


def _fwd_kernel(*refs, cfg: KernelConfig):
    (q_ref, k_ref, v_ref), q_seg, kv_seg, (o_ref, lse_ref, m_sc, l_sc, acc_sc) = _split(
        refs, cfg, 3)
    bq, bkv = cfg.blocks.block_q, cfg.blocks.block_kv
    qi, ki = pl.program_id(2), pl.program_id(3)

    @pl.when(ki == 0)
    def _init():
        m_sc[...], l_sc[...], acc_sc[...] = _blocks.init_stats(bq, acc_sc.shape[-1])

    @pl.when(ki < _num_kv_blocks(cfg, qi, bq, bkv))
    def _step():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        prec = _blocks.precision_for(q.dtype)
        mask = _blocks.block_mask(cfg.mask, qi * bq, ki * bkv, bq, bkv, q_seg, kv_seg)
        s = _blocks.scores(q, k, cfg.sm_scale, mask, prec)
        m_sc[...], l_sc[...], acc_sc[...] = _blocks.online_softmax_step(
            s, mask, v, m_sc[...], l_sc[...], acc_sc[...], prec)

    @pl.when(ki == pl.num_programs(3) - 1)
    def _finish():
        o_ref[...], lse_ref[...] = _blocks.finalize(m_sc[...], l_sc[...], acc_sc[...],
                                                    o_ref.dtype)


def forward(cfg: KernelConfig, q, k, v, q_seg, kv_seg):
    """Returns (out [B, Sq, H, D], lse f32 [B, H, Sq, 1]) for padded [B, S, H, D] inputs."""
    q, k, v = _to_bhsd(q), _to_bhsd(k), _to_bhsd(v)
    batch, heads, q_seq, head_dim = q.shape
    kv_seq = k.shape[2]
    bq, bkv, g = cfg.blocks.block_q, cfg.blocks.block_kv, cfg.group

    def kv_block(i, j):  # repeat the last visible block: Pallas skips the copy
        return jnp.minimum(j, jnp.maximum(_num_kv_blocks(cfg, i, bq, bkv) - 1, 0))

    q_spec = _spec("q", (None, None, bq, head_dim), lambda b, h, i, j: (b, h, i, 0), q.shape)
    kv_spec = _spec("k/v", (None, None, bkv, head_dim),
                    lambda b, h, i, j: (b, h // g, kv_block(i, j), 0), k.shape)
    lse_spec = _spec("lse", (None, None, bq, 1), lambda b, h, i, j: (b, h, i, 0),
                     (batch, heads, q_seq, 1))
    in_specs = [q_spec, kv_spec, kv_spec] + _segment_specs(
        cfg, batch, q_seq, kv_seq, bq, bkv, lambda b, h, i, j: (b, i, 0),
        lambda b, h, i, j: (b, 0, kv_block(i, j)))
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, q_seq, 1), jnp.float32)],
        grid=(batch, heads, q_seq // bq, kv_seq // bkv),
        in_specs=in_specs,
        out_specs=[q_spec, lse_spec],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, head_dim), jnp.float32)],
        interpret=backends.interpret_arg(cfg.backend),
        compiler_params=backends.compiler_params(cfg.backend, dimension_semantics=_SEMANTICS),
        name="flash_attention_fwd_tpu",
    )(q, k, v, *_segment_inputs(cfg, q_seg, kv_seg))
    return _to_bhsd(out), lse


def _dkdv_kernel(*refs, cfg: KernelConfig, num_q_blocks: int):
    ins, q_seg, kv_seg, (dk_ref, dv_ref, dk_sc, dv_sc) = _split(refs, cfg, 6)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    bq, bkv = cfg.blocks.block_q_dkv, cfg.blocks.block_kv_dkv
    ki, j = pl.program_id(2), pl.program_id(3)
    qi = j % num_q_blocks  # j walks (query head in the group, query block)
    lo, hi = _q_block_range(cfg, ki, bq, bkv)

    @pl.when(j == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(jnp.logical_and(qi >= lo, qi < hi))
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        prec = _blocks.precision_for(q.dtype)
        mask = _blocks.block_mask(cfg.mask, qi * bq, ki * bkv, bq, bkv, q_seg, kv_seg)
        p, ds = _blocks.backward_tile(q, k, v, do, lse_ref[...], delta_ref[...], mask,
                                      cfg.sm_scale, prec)
        dv_sc[...] += _blocks.dot(p.astype(do.dtype), do, trans_a=True, precision=prec)
        dk_sc[...] += _blocks.dot(ds.astype(q.dtype), q, trans_a=True, precision=prec)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * cfg.sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, cfg: KernelConfig):
    ins, q_seg, kv_seg, (dq_ref, dq_sc) = _split(refs, cfg, 6)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    bq, bkv = cfg.blocks.block_q_dq, cfg.blocks.block_kv_dq
    qi, ki = pl.program_id(2), pl.program_id(3)

    @pl.when(ki == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(ki < _num_kv_blocks(cfg, qi, bq, bkv))
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        prec = _blocks.precision_for(q.dtype)
        mask = _blocks.block_mask(cfg.mask, qi * bq, ki * bkv, bq, bkv, q_seg, kv_seg)
        _, ds = _blocks.backward_tile(q, k, v, do, lse_ref[...], delta_ref[...], mask,
                                      cfg.sm_scale, prec)
        dq_sc[...] += _blocks.dot(ds.astype(k.dtype), k, precision=prec)

    @pl.when(ki == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * cfg.sm_scale).astype(dq_ref.dtype)


def backward(cfg: KernelConfig, q, k, v, q_seg, kv_seg, out, lse, do):
    """Returns (dq, dk, dv) [B, S, H, D] for padded inputs; lse f32 [B, H, Sq, 1]."""
    # delta_i = rowsum(dO_i * O_i), one fused XLA pass shared by both kernels.
    delta = jnp.einsum("bshd,bshd->bhs", do.astype(jnp.float32),
                       out.astype(jnp.float32))[..., None]
    q, k, v, do = _to_bhsd(q), _to_bhsd(k), _to_bhsd(v), _to_bhsd(do)
    batch, heads, q_seq, head_dim = q.shape
    kv_heads, kv_seq = k.shape[1], k.shape[2]
    g = cfg.group
    interpret = backends.interpret_arg(cfg.backend)
    params = backends.compiler_params(cfg.backend, dimension_semantics=_SEMANTICS)
    seg_args = _segment_inputs(cfg, q_seg, kv_seg)
    stat_shape = (batch, heads, q_seq, 1)

    # dK/dV: grid (batch, kv_head, key block, group * query block).
    bq, bkv = cfg.blocks.block_q_dkv, cfg.blocks.block_kv_dkv
    nq = q_seq // bq

    def q_block(ki, j):  # clamp into the visible range: repeated indices skip the DMA
        lo, hi = _q_block_range(cfg, ki, bq, bkv)
        return jnp.minimum(jnp.clip(j % nq, lo, jnp.maximum(hi - 1, lo)), nq - 1)

    def q_index(b, h, ki, j):
        return (b, h * g + j // nq, q_block(ki, j), 0)

    q_spec = _spec("q/dO", (None, None, bq, head_dim), q_index, q.shape)
    kv_spec = _spec("k/v", (None, None, bkv, head_dim), lambda b, h, ki, j: (b, h, ki, 0),
                    k.shape)
    stat_spec = _spec("lse/delta", (None, None, bq, 1), q_index, stat_shape)
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec] + _segment_specs(
        cfg, batch, q_seq, kv_seq, bq, bkv, lambda b, h, ki, j: (b, q_block(ki, j), 0),
        lambda b, h, ki, j: (b, 0, ki))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg, num_q_blocks=nq),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        grid=(batch, kv_heads, kv_seq // bkv, g * nq),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        scratch_shapes=[pltpu.VMEM((bkv, head_dim), jnp.float32)] * 2,
        interpret=interpret,
        compiler_params=params,
        name="flash_attention_dkdv_tpu",
    )(q, k, v, do, lse, delta, *seg_args)

    # dQ: grid (batch, head, query block, key block), like the forward pass.
    bq, bkv = cfg.blocks.block_q_dq, cfg.blocks.block_kv_dq

    def kv_block(i, j):
        return jnp.minimum(j, jnp.maximum(_num_kv_blocks(cfg, i, bq, bkv) - 1, 0))

    q_spec = _spec("q/dO", (None, None, bq, head_dim), lambda b, h, i, j: (b, h, i, 0), q.shape)
    kv_spec = _spec("k/v", (None, None, bkv, head_dim),
                    lambda b, h, i, j: (b, h // g, kv_block(i, j), 0), k.shape)
    stat_spec = _spec("lse/delta", (None, None, bq, 1), lambda b, h, i, j: (b, h, i, 0),
                      stat_shape)
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec] + _segment_specs(
        cfg, batch, q_seq, kv_seq, bq, bkv, lambda b, h, i, j: (b, i, 0),
        lambda b, h, i, j: (b, 0, kv_block(i, j)))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(batch, heads, q_seq // bq, kv_seq // bkv),
        in_specs=in_specs,
        out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)],
        interpret=interpret,
        compiler_params=params,
        name="flash_attention_dq_tpu",
    )(q, k, v, do, lse, delta, *seg_args)
    return _to_bhsd(dq), _to_bhsd(dk), _to_bhsd(dv)
