"""The TPU-style kernels under Pallas' TPU interpreter (memory spaces, grid, (8, 128) tiling)."""

import jax.numpy as jnp
import numpy as np
import pytest
from pallas_testing import assert_close_f32, kernel_and_reference, random_inputs

from pallas_kernels import BlockSizes, flash_attention, flash_decode, reference

# (batch, q_len, kv_len, heads, kv_heads, head_dim, causal, segments, block sizes)
CASES = [
    (1, 128, 128, 2, 2, 64, False, False, None),  # default blocks shrink to the sequence
    (1, 64, 256, 4, 2, 32, True, True, BlockSizes(32, 128, 16, 128, 32, 128)),  # GQA, skips
    (1, 200, 130, 2, 1, 128, True, False, BlockSizes(64, 128, 64, 128, 64, 128)),  # padding
]


@pytest.mark.parametrize("batch,q_len,kv_len,heads,kv_heads,head_dim,causal,segments,blocks",
                         CASES)
def test_tpu_kernels_match_reference(batch, q_len, kv_len, heads, kv_heads, head_dim, causal,
                                     segments, blocks):
    q, k, v, do, segs = random_inputs(10, batch, q_len, kv_len, heads, kv_heads, head_dim,
                                      segments=segments)
    got, want = kernel_and_reference(q, k, v, do, causal=causal, segment_ids=segs,
                                     block_sizes=blocks, backend="tpu_interpret")
    assert_close_f32(got, want)


def test_tpu_tiling_is_enforced():
    # 64 keys per block over a 256-long key axis breaks the 128-lane tiling of the logits'
    # and the key segment ids' blocks: Mosaic would reject it, so we do too.
    q, k, v, _, segs = random_inputs(11, 1, 64, 256, 2, 2, 32, segments=True)
    with pytest.raises(ValueError, match="multiple of 128"):
        flash_attention(q, k, v, segment_ids=segs, block_sizes=BlockSizes(block_kv=64),
                        backend="tpu_interpret")


def test_tpu_decode_matches_reference():
    q, k, v, _, _ = random_inputs(12, 2, 3, 256, 4, 2, 64)
    lengths = jnp.array([2, 200], jnp.int32)
    got = flash_decode(q, k, v, lengths, block_kv=128, backend="tpu_interpret")
    np.testing.assert_allclose(got, reference.decode(q, k, v, lengths), atol=1e-5, rtol=1e-5)
