"""flash_decode against the reference and against full attention over each row's prefix."""

import jax.numpy as jnp
import numpy as np
import pytest
from pallas_testing import random_inputs

from pallas_kernels import flash_attention, flash_decode, reference


@pytest.mark.parametrize("batch,q_len,heads,kv_heads,max_len,head_dim,lengths,block_kv", [
    (2, 1, 4, 2, 256, 64, [1, 200], 64),  # one new token, GQA
    (2, 4, 8, 1, 100, 32, [3, 100], 32),  # MQA; a row shorter than q_len; padded cache
    (2, 3, 2, 2, 130, 128, [130, 77], None),  # default block
    (1, 8, 4, 4, 64, 256, [64], 16),  # head_dim 256, full cache
])
def test_decode_matches_reference(batch, q_len, heads, kv_heads, max_len, head_dim, lengths,
                                  block_kv):
    q, k, v, _, _ = random_inputs(20, batch, q_len, max_len, heads, kv_heads, head_dim)
    lengths = jnp.array(lengths, jnp.int32)
    got = flash_decode(q, k, v, lengths, block_kv=block_kv, backend="interpret")
    want = reference.decode(q, k, v, lengths)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_decode_equals_causal_attention_on_prefix():
    """Decoding q_len tokens over a cache of length L is causal attention of those queries
    over the first L keys (causal aligned at the end)."""
    q, k, v, _, _ = random_inputs(21, 2, 4, 96, 4, 2, 32)
    lengths = [37, 96]
    got = flash_decode(q, k, v, jnp.array(lengths, jnp.int32), block_kv=32, backend="interpret")
    for b, n in enumerate(lengths):
        want = flash_attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], causal=True,
                               backend="interpret")
        np.testing.assert_allclose(got[b:b + 1], want, atol=1e-5, rtol=1e-5)


def test_decode_bfloat16():
    # One bf16 rounding of the probabilities and one of the output: <= 2u * max |v|, u = 2^-8.
    q, k, v, _, _ = random_inputs(22, 2, 2, 128, 4, 2, 64, dtype=jnp.bfloat16)
    lengths = jnp.array([50, 128], jnp.int32)
    got = flash_decode(q, k, v, lengths, block_kv=32, backend="interpret")
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = reference.decode(*f32, lengths)
    assert got.dtype == jnp.bfloat16
    err = np.abs(np.asarray(got, np.float32) - np.asarray(want)).max()
    assert err <= 2 * 2.0**-8 * np.abs(np.asarray(f32[2])).max()
