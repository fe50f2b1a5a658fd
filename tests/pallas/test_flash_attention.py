"""flash_attention (GPU-style kernels in interpret mode) against the jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pallas_testing import (
    BF16_U,
    assert_close_f32,
    kernel_and_reference,
    random_inputs,
    value_and_grads,
)

from pallas_kernels import BlockSizes, SegmentIds, flash_attention, reference

B16, B32 = BlockSizes(16, 16, 16, 16, 16, 16), BlockSizes(32, 32, 32, 32, 32, 32)

# (batch, q_len, kv_len, heads, kv_heads, head_dim, causal, segments, block sizes)
CASES = [
    (2, 128, 128, 2, 2, 64, False, False, None),  # default blocks, multi-head
    (2, 128, 128, 2, 2, 64, True, False, B32),  # causal block skipping, 4x4 tiles
    (1, 100, 75, 4, 2, 32, True, True, BlockSizes(32, 16, 16, 32, 32, 16)),  # GQA, odd lengths
    (1, 64, 150, 4, 1, 128, True, False, B32),  # MQA, q_len < kv_len (cache-like causal)
    (1, 150, 64, 4, 1, 128, True, True, B32),  # q_len > kv_len: early rows see no key
    (2, 96, 96, 2, 1, 256, False, True, B32),  # head_dim 256, segments
    (1, 33, 47, 3, 3, 32, False, False, B16),  # odd everything
    (1, 256, 256, 2, 2, 64, True, False, BlockSizes(64, 128, 128, 64, 64, 128)),  # mixed tiles
]


@pytest.mark.parametrize("batch,q_len,kv_len,heads,kv_heads,head_dim,causal,segments,blocks",
                         CASES)
def test_float32_matches_reference(batch, q_len, kv_len, heads, kv_heads, head_dim, causal,
                                   segments, blocks):
    q, k, v, do, segs = random_inputs(0, batch, q_len, kv_len, heads, kv_heads, head_dim,
                                      segments=segments)
    got, want = kernel_and_reference(q, k, v, do, causal=causal, segment_ids=segs,
                                     block_sizes=blocks)
    assert_close_f32(got, want)


@pytest.mark.slow  # ~25 s: four fresh compilations of three kernels
@settings(max_examples=4, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 2),
    q_len=st.integers(1, 130),
    kv_len=st.integers(1, 130),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 2, 3]),
    head_dim=st.sampled_from([32, 64]),
    causal=st.booleans(),
    segments=st.booleans(),
    block=st.sampled_from([16, 32, 64]),
)
def test_random_shapes_match_reference(batch, q_len, kv_len, kv_heads, group, head_dim, causal,
                                       segments, block):
    q, k, v, do, segs = random_inputs(1, batch, q_len, kv_len, kv_heads * group, kv_heads,
                                      head_dim, segments=segments)
    blocks = BlockSizes(block, 2 * block, 2 * block, block, block, 2 * block)
    got, want = kernel_and_reference(q, k, v, do, causal=causal, segment_ids=segs,
                                     block_sizes=blocks)
    assert_close_f32(got, want)


@pytest.mark.parametrize("q_len,kv_len,heads,kv_heads,head_dim,causal", [
    (128, 128, 2, 2, 64, True),
    (96, 160, 4, 2, 128, False),
    (64, 64, 2, 1, 256, True),
])
def test_bfloat16_error_is_that_of_bf16_rounding(q_len, kv_len, heads, kv_heads, head_dim,
                                                 causal):
    """bf16 inputs, float32 accumulation: compared with the float32 reference on the same
    bf16 values, the kernel's error comes from rounding to bf16 (unit roundoff u = 2^-8) of
    (1) probabilities P, or dS in the backward pass, before their matmuls (each term off by
    <= u relative, so a sum is off by <= u * its absolute sum, which for these inputs is of
    the order of max |result|); (2) the output O that enters delta = rowsum(dO * O); (3) the
    result itself. The accumulation over <= 160 keys/queries is float32 and adds ~nothing.
    Hence max error <= 4u * max |reference| (three roundings plus one u of slack for the
    absolute sums exceeding max |result|). A naive bf16 attention (the reference computing
    in bf16: logits rounded to bf16, softmax in f32) suffers the same roundings and more, so
    the kernel's error must also be at most about its error (a factor 2: errors here are
    one or two bf16 ulps, so they come quantised)."""
    q, k, v, do, _ = random_inputs(2, 1, q_len, kv_len, heads, kv_heads, head_dim,
                                   dtype=jnp.bfloat16)
    blocks = BlockSizes(32, 64, 64, 32, 32, 64)
    got, want = kernel_and_reference(q, k, v, do, causal=causal, block_sizes=blocks)
    naive = value_and_grads(
        lambda q, k, v: reference.attention(q, k, v, causal=causal,
                                            compute_dtype=jnp.bfloat16), q, k, v, do)
    for name, g, w, n in zip(("out", "dq", "dk", "dv"), got, want, naive, strict=True):
        assert g.dtype == jnp.bfloat16, name
        g, w, n = (np.asarray(x, np.float32) for x in (g, w, n))
        err, naive_err = np.abs(g - w).max(), np.abs(n - w).max()
        assert err <= 4 * BF16_U * np.abs(w).max(), f"{name}: {err:.3g}"
        assert err <= 2 * naive_err, f"{name}: kernel {err:.3g} vs naive bf16 {naive_err:.3g}"


def test_segment_id_forms_agree():
    q, k, v, _, _ = random_inputs(3, 2, 64, 64, 2, 2, 32)
    ids = jnp.sort(jax.random.randint(jax.random.key(9), (2, 64), 0, 4), axis=1)
    want = reference.attention(q, k, v, segment_ids=ids)
    for form in (ids, (ids, ids), SegmentIds(ids, ids)):
        got = flash_attention(q, k, v, segment_ids=form, block_sizes=B32, backend="interpret")
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # Segments really mask: the result differs from unmasked attention.
    assert np.abs(want - reference.attention(q, k, v)).max() > 1e-2


def test_causal_skips_fully_masked_blocks():
    """Keys after the first query block are NaN: if their (fully masked) blocks were loaded
    into the first block's matmuls, 0 * NaN would poison its rows."""
    q, k, v, do, _ = random_inputs(4, 1, 128, 128, 2, 2, 32)
    poisoned_k = k.at[:, 32:].set(jnp.nan)
    poisoned_v = v.at[:, 32:].set(jnp.nan)

    def first_block(q):
        out = flash_attention(q, poisoned_k, poisoned_v, causal=True, block_sizes=B32,
                              backend="interpret")
        return out[:, :32]

    out, vjp = jax.vjp(first_block, q)
    (dq,) = vjp(do[:, :32])
    want, ref_vjp = jax.vjp(lambda q: reference.attention(q, k, v, causal=True)[:, :32], q)
    (want_dq,) = ref_vjp(do[:, :32])
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(dq[:, :32], want_dq[:, :32], atol=1e-5, rtol=1e-5)


def test_rows_without_visible_keys_are_zero():
    # q_len > kv_len, causal: query i sees keys j <= i - 16, so the first 16 rows see none.
    q, k, v, do, _ = random_inputs(5, 1, 48, 32, 2, 1, 32)
    out, dq, dk, dv = value_and_grads(
        lambda q, k, v: flash_attention(q, k, v, causal=True, block_sizes=B16,
                                        backend="interpret"), q, k, v, do)
    assert np.all(np.asarray(out[:, :16]) == 0) and np.all(np.asarray(dq[:, :16]) == 0)
    assert np.all(np.isfinite(np.asarray(dk))) and np.all(np.isfinite(np.asarray(dv)))
    assert np.abs(np.asarray(out[:, 16:])).max() > 0


def test_jit_and_custom_scale():
    q, k, v, _, _ = random_inputs(6, 1, 40, 40, 2, 2, 64)
    fn = jax.jit(lambda q, k, v: flash_attention(q, k, v, sm_scale=0.3, backend="interpret"))
    want = reference.attention(q, k, v, sm_scale=0.3)
    np.testing.assert_allclose(fn(q, k, v), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shapes,kwargs,match", [
    (((1, 8, 4, 32), (1, 8, 3, 32), (1, 8, 3, 32)), {}, "divide"),
    (((1, 8, 4, 32), (1, 8, 4, 16), (1, 8, 4, 16)), {}, "head_dim"),
    (((1, 8, 4, 32), (1, 9, 4, 32), (1, 9, 4, 32)),
     {"segment_ids": jnp.zeros((1, 8), jnp.int32)}, "q_len == kv_len"),
])
def test_bad_arguments_raise(shapes, kwargs, match):
    q, k, v = (jnp.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, backend="interpret", **kwargs)
