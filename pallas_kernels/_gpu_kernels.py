"""GPU-style flash-attention kernels: one program per output block, a loop over the other axis.

Used by the "triton" backend and, through Pallas' HLO interpreter, by "interpret". Arrays
keep the caller's layout [batch, seq, heads, head_dim]: a block spec squeezes batch and head,
so each program sees [seq_block, head_dim] tiles, and K/V index maps send query head h to
K/V head h // group (grouped-query attention without repeating K/V in memory).

Inputs are already padded (seq to block multiples). Per-row statistics lse and delta are
float32 [batch, heads, q_seq].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _blocks, backends
from pallas_kernels.config import KernelConfig


def _cdiv(a, b):
    return (a + b - 1) // b


def _kv_blocks_for_q_block(cfg: KernelConfig, q_start, block_q: int, block_kv: int):
    """Number of leading key blocks a query block can see (skips fully masked blocks)."""
    n = _cdiv(cfg.mask.kv_len, block_kv)
    if cfg.mask.causal:
        last_key = q_start + block_q - 1 + cfg.mask.offset  # largest visible key, may be < 0
        n = jnp.clip((last_key + block_kv) // block_kv, 0, n)
    return n


def _first_q_block_for_kv_block(cfg: KernelConfig, kv_start, block_q: int):
    """First query block that can see a key block (0 unless causal)."""
    if not cfg.mask.causal:
        return 0
    return jnp.maximum((kv_start - cfg.mask.offset) // block_q, 0)


def _split_refs(refs, has_segments: bool, n_in: int):
    """(inputs, q_seg_ref, kv_seg_ref, outputs) from the flat ref list of a kernel."""
    ins = list(refs[:n_in])
    rest = list(refs[n_in:])
    if has_segments:
        return ins, rest[0], rest[1], rest[2:]
    return ins, None, None, rest


def _fwd_kernel(*refs, cfg: KernelConfig):
    (q_ref, k_ref, v_ref), qs_ref, ks_ref, (o_ref, lse_ref) = _split_refs(
        refs, cfg.mask.has_segments, 3)
    bq, bkv = cfg.blocks.block_q, cfg.blocks.block_kv
    q_start = pl.program_id(2) * bq
    q = q_ref[...]  # [bq, D]
    prec = _blocks.precision_for(q.dtype)
    q_seg = qs_ref[...][:, None] if qs_ref is not None else None

    def body(j, carry):
        start = pl.multiple_of(j * bkv, bkv)
        k = k_ref[pl.ds(start, bkv), :]
        v = v_ref[pl.ds(start, bkv), :]
        kv_seg = ks_ref[pl.ds(start, bkv)][None, :] if ks_ref is not None else None
        mask = _blocks.block_mask(cfg.mask, q_start, start, bq, bkv, q_seg, kv_seg)
        s = _blocks.scores(q, k, cfg.sm_scale, mask, prec)
        return _blocks.online_softmax_step(s, mask, v, *carry, prec)

    n_kv = _kv_blocks_for_q_block(cfg, q_start, bq, bkv)
    m, row_sum, acc = lax.fori_loop(0, n_kv, body, _blocks.init_stats(bq, q.shape[-1]))
    out, lse = _blocks.finalize(m, row_sum, acc, o_ref.dtype)
    o_ref[...] = out
    lse_ref[...] = lse.reshape(bq)


def _seg_specs(cfg, q_block, q_index, kv_block, kv_index):
    if not cfg.mask.has_segments:
        return []
    return [pl.BlockSpec((None, q_block), q_index), pl.BlockSpec((None, kv_block), kv_index)]


def _seg_args(cfg, q_seg, kv_seg):
    return [q_seg, kv_seg] if cfg.mask.has_segments else []


def forward(cfg: KernelConfig, q, k, v, q_seg, kv_seg):
    """Returns (out [B, Sq, H, D], lse f32 [B, H, Sq]) for padded inputs."""
    batch, q_seq, heads, head_dim = q.shape
    kv_seq = k.shape[1]
    bq, g = cfg.blocks.block_q, cfg.group
    grid = (batch, heads, q_seq // bq)
    q_spec = pl.BlockSpec((None, bq, None, head_dim), lambda b, h, i: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, kv_seq, None, head_dim), lambda b, h, i: (b, 0, h // g, 0))
    in_specs = [q_spec, kv_spec, kv_spec] + _seg_specs(
        cfg, bq, lambda b, h, i: (b, i), kv_seq, lambda b, h, i: (b, 0))
    out_specs = [q_spec, pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_seq), jnp.float32)]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        interpret=backends.interpret_arg(cfg.backend),
        compiler_params=backends.compiler_params(cfg.backend, num_warps=4, num_stages=2),
        name="flash_attention_fwd",
    )(q, k, v, *_seg_args(cfg, q_seg, kv_seg))


def _dkdv_kernel(*refs, cfg: KernelConfig):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qs_ref, ks_ref, (dk_ref, dv_ref) = (
        _split_refs(refs, cfg.mask.has_segments, 6))
    bq, bkv = cfg.blocks.block_q_dkv, cfg.blocks.block_kv_dkv
    kv_start = pl.program_id(2) * bkv
    k, v = k_ref[...], v_ref[...]  # [bkv, D]
    prec = _blocks.precision_for(k.dtype)
    kv_seg = ks_ref[...][None, :] if ks_ref is not None else None
    lo = _first_q_block_for_kv_block(cfg, kv_start, bq)
    hi = _cdiv(cfg.mask.q_len, bq)  # padded query rows carry dO = 0: skip them

    def q_block(i, carry, g):
        dk, dv = carry
        start = pl.multiple_of(i * bq, bq)
        rows = pl.ds(start, bq)
        q, do = q_ref[rows, g, :], do_ref[rows, g, :]
        lse, delta = lse_ref[g, rows][:, None], delta_ref[g, rows][:, None]
        q_seg = qs_ref[rows][:, None] if qs_ref is not None else None
        mask = _blocks.block_mask(cfg.mask, start, kv_start, bq, bkv, q_seg, kv_seg)
        p, ds = _blocks.backward_tile(q, k, v, do, lse, delta, mask, cfg.sm_scale, prec)
        dv = dv + _blocks.dot(p.astype(do.dtype), do, trans_a=True, precision=prec)
        dk = dk + _blocks.dot(ds.astype(q.dtype), q, trans_a=True, precision=prec)
        return dk, dv

    def head(g, carry):
        # All query heads that share this K/V head contribute to its gradient.
        return lax.fori_loop(lo, hi, functools.partial(q_block, g=g), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, cfg.group, head, (zeros, zeros))
    dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, cfg: KernelConfig):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qs_ref, ks_ref, (dq_ref,) = (
        _split_refs(refs, cfg.mask.has_segments, 6))
    bq, bkv = cfg.blocks.block_q_dq, cfg.blocks.block_kv_dq
    q_start = pl.program_id(2) * bq
    q, do = q_ref[...], do_ref[...]
    prec = _blocks.precision_for(q.dtype)
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_seg = qs_ref[...][:, None] if qs_ref is not None else None

    def body(j, dq):
        start = pl.multiple_of(j * bkv, bkv)
        k = k_ref[pl.ds(start, bkv), :]
        v = v_ref[pl.ds(start, bkv), :]
        kv_seg = ks_ref[pl.ds(start, bkv)][None, :] if ks_ref is not None else None
        mask = _blocks.block_mask(cfg.mask, q_start, start, bq, bkv, q_seg, kv_seg)
        _, ds = _blocks.backward_tile(q, k, v, do, lse, delta, mask, cfg.sm_scale, prec)
        return dq + _blocks.dot(ds.astype(k.dtype), k, precision=prec)

    n_kv = _kv_blocks_for_q_block(cfg, q_start, bq, bkv)
    dq = lax.fori_loop(0, n_kv, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)


def backward(cfg: KernelConfig, q, k, v, q_seg, kv_seg, out, lse, do):
    """Returns (dq, dk, dv) for padded inputs; lse f32 [B, H, Sq] from `forward`."""
    batch, q_seq, heads, head_dim = q.shape
    kv_seq, kv_heads = k.shape[1], k.shape[2]
    g = cfg.group
    # delta_i = rowsum(dO_i * O_i): one cheap fused XLA pass, shared by both kernels.
    delta = jnp.einsum("bshd,bshd->bhs", do.astype(jnp.float32), out.astype(jnp.float32))
    interpret = backends.interpret_arg(cfg.backend)
    params = backends.compiler_params(cfg.backend, num_warps=4, num_stages=2)

    bkv = cfg.blocks.block_kv_dkv
    group_spec = pl.BlockSpec((None, q_seq, g, head_dim), lambda b, h, j: (b, 0, h, 0))
    kv_spec = pl.BlockSpec((None, bkv, None, head_dim), lambda b, h, j: (b, j, h, 0))
    stat_spec = pl.BlockSpec((None, g, q_seq), lambda b, h, j: (b, h, 0))
    in_specs = [group_spec, kv_spec, kv_spec, group_spec, stat_spec, stat_spec] + _seg_specs(
        cfg, q_seq, lambda b, h, j: (b, 0), bkv, lambda b, h, j: (b, j))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        grid=(batch, kv_heads, kv_seq // bkv),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        interpret=interpret,
        compiler_params=params,
        name="flash_attention_dkdv",
    )(q, k, v, do, lse, delta, *_seg_args(cfg, q_seg, kv_seg))

    bq, bkv = cfg.blocks.block_q_dq, cfg.blocks.block_kv_dq
    q_spec = pl.BlockSpec((None, bq, None, head_dim), lambda b, h, i: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, kv_seq, None, head_dim), lambda b, h, i: (b, 0, h // g, 0))
    stat_spec = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec] + _seg_specs(
        cfg, bq, lambda b, h, i: (b, i), kv_seq, lambda b, h, i: (b, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(batch, heads, q_seq // bq),
        in_specs=in_specs,
        out_specs=q_spec,
        interpret=interpret,
        compiler_params=params,
        name="flash_attention_dq",
    )(q, k, v, do, lse, delta, *_seg_args(cfg, q_seg, kv_seg))
    return dq, dk, dv
