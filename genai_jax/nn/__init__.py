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
    LoRA,
    LoRAParam,
    lookup,
    param,
    rematerialized,
    rope_frequencies,
    rotary,
)

__all__ = ["IMPLEMENTATIONS", "MLP", "REMAT_POLICIES", "Conv", "Dense", "Embed", "GroupNorm",
           "LayerNorm", "LoRA", "LoRAParam",
           "dot_product_attention", "lookup", "param", "rematerialized",
           "rope_frequencies", "rotary"]
