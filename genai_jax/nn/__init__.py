"""Shared layers: the attention entry point, norms, MLPs, position encodings."""

from genai_jax.nn.attention import IMPLEMENTATIONS, dot_product_attention
from genai_jax.nn.layers import MLP, Dense, Embed, LayerNorm, param, rotary

__all__ = ["IMPLEMENTATIONS", "MLP", "Dense", "Embed", "LayerNorm", "dot_product_attention",
           "param", "rotary"]
