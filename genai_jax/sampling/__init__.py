"""Decoding with a KV cache (and, with the image families, diffusion samplers)."""

from genai_jax.sampling.decode import generate, sample_logits

__all__ = ["generate", "sample_logits"]
