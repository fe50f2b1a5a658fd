"""Shared layers: the attention entry point, norms, MLPs, convolutions, position encodings."""

from genai_jax.nn.attention import IMPLEMENTATIONS, dot_product_attention
from genai_jax.nn.layers import (
    MLP,
    REMAT_POLICIES,
    Conv,
    Dense,
    Embed,
    GroupNorm,
    LayerNorm,
    lookup,
    param,
    rematerialized,
    rotary,
)

__all__ = ["IMPLEMENTATIONS", "MLP", "REMAT_POLICIES", "Conv", "Dense", "Embed", "GroupNorm",
           "LayerNorm", "dot_product_attention", "lookup", "param", "rematerialized", "rotary"]
