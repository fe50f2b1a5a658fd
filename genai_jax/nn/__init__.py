"""Shared layers: the attention entry point, norms, MLPs, convolutions, position encodings."""

from genai_jax.nn.attention import IMPLEMENTATIONS, dot_product_attention
from genai_jax.nn.layers import MLP, Conv, Dense, Embed, GroupNorm, LayerNorm, lookup, param, rotary

__all__ = ["IMPLEMENTATIONS", "MLP", "Conv", "Dense", "Embed", "GroupNorm", "LayerNorm",
           "dot_product_attention", "lookup", "param", "rotary"]
