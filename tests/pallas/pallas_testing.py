"""Shared helpers for tests/pallas: random inputs, kernel-vs-reference comparison."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import flash_attention, reference

# bfloat16 keeps 8 significant bits: unit roundoff u = 2^-8.
BF16_U = 2.0**-8


def random_inputs(seed: int, batch: int, q_len: int, kv_len: int, heads: int, kv_heads: int,
                  head_dim: int, dtype=jnp.float32, segments: bool = False):
    """q, k, v, cotangent dO, and (q, kv) segment ids (or None)."""
    kq, kk, kv, kd, ks1, ks2 = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(kq, (batch, q_len, heads, head_dim)).astype(dtype)
    k = jax.random.normal(kk, (batch, kv_len, kv_heads, head_dim)).astype(dtype)
    v = jax.random.normal(kv, (batch, kv_len, kv_heads, head_dim)).astype(dtype)
    do = jax.random.normal(kd, (batch, q_len, heads, head_dim)).astype(dtype)
    segs = None
    if segments:
        # Sorted ids: packed sequences of random lengths, 3 documents per row.
        segs = (jnp.sort(jax.random.randint(ks1, (batch, q_len), 0, 3), axis=1),
                jnp.sort(jax.random.randint(ks2, (batch, kv_len), 0, 3), axis=1))
    return q, k, v, do, segs


def value_and_grads(fn, q, k, v, do):
    """(out, dq, dk, dv) of fn(q, k, v) for cotangent do."""
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(do.astype(out.dtype)))


def kernel_and_reference(q, k, v, do, *, causal=False, segment_ids=None, block_sizes=None,
                         backend="interpret", compute_dtype=jnp.float32):
    """(out, dq, dk, dv) of the kernel and of the reference run on float32 copies."""
    def kernel(q, k, v):
        return flash_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                               block_sizes=block_sizes, backend=backend)

    def ref(q, k, v):
        return reference.attention(q, k, v, causal=causal, segment_ids=segment_ids,
                                   compute_dtype=compute_dtype)

    got = value_and_grads(kernel, q, k, v, do)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    want = value_and_grads(ref, *f32)
    return got, want


def assert_close_f32(got, want, names=("out", "dq", "dk", "dv"), tol=1e-5):
    """Max abs error <= tol * max(1, max |want|): float32 sums in a different order."""
    for name, g, w in zip(names, got, want, strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, (name, g.shape, w.shape)
        err = np.abs(g - w).max()
        assert err <= tol * max(1.0, np.abs(w).max()), f"{name}: max error {err:.3g}"
