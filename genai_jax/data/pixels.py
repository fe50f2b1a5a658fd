"""Pixel scaling between the data's uint8 images and the range the image models work in.

Every image family sees images in [-1, 1] (`to_model`, `x / 127.5 - 1`) and hands generated
images back in [-1, 1] (`to_uint8` inverts it); the VAE's Bernoulli likelihood binarises the
[0, 1] pixels instead (`binarize`). Toy points pass through unscaled. Here, below both the
families (`genai_jax.models.images`) and the sample metrics (`genai_jax.evaluation.images`),
because both convert.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def to_model(x: jax.Array) -> jax.Array:
    """Batch `x` as float32 in the model's range: uint8 pixels to [-1, 1]; points unchanged."""
    if x.dtype == jnp.uint8:
        return x.astype(jnp.float32) / 127.5 - 1.0
    return x.astype(jnp.float32)


def to_uint8(x, xp=np) -> np.ndarray:
    """Images in [-1, 1] back to uint8 pixels; `xp=jnp` traces the same rule into a compiled
    function (the exported samplers, `genai_jax.serving.export_images`)."""
    return xp.asarray(xp.clip(xp.round((xp.asarray(x, xp.float32) + 1.0) * 127.5), 0, 255),
                      xp.uint8)


def binarize(x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """uint8 pixels as {0, 1} float32: sampled with probability pixel/255 when `rng` is given
    (dynamic binarisation, for training), else thresholded at 1/2 (fixed, for evaluation)."""
    p = x.astype(jnp.float32) / 255.0
    if rng is None:
        return (p > 0.5).astype(jnp.float32)
    return jax.random.bernoulli(rng, p).astype(jnp.float32)
