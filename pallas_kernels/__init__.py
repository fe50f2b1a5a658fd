"""Pallas kernels for attention, with pure-jnp references; importable without genai_jax.

    from pallas_kernels import flash_attention, flash_decode
    out = flash_attention(q, k, v, causal=True)        # [batch, seq, heads, head_dim]
    out = flash_decode(q_new, k_cache, v_cache, lengths)

`backend=None` picks the platform's lowering: "interpret" on CPU, "triton" on GPU, "tpu" on
TPU; "tpu_interpret" runs the TPU kernels on the CPU (see pallas_kernels.backends).
`python -m pallas_kernels.benchmark` times the kernels against XLA (and cuDNN on GPU).
"""

from pallas_kernels.backends import BACKENDS, available_backends, resolve_backend
from pallas_kernels.config import BlockSizes
from pallas_kernels.decode import flash_decode
from pallas_kernels.flash_attention import SegmentIds, flash_attention

__all__ = [
    "BACKENDS",
    "BlockSizes",
    "SegmentIds",
    "available_backends",
    "flash_attention",
    "flash_decode",
    "resolve_backend",
]
