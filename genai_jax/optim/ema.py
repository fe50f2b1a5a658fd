"""The exponential moving average of parameters that every family evaluates and samples with.

One rule for every family: the decay at step t is `min(decay, (1 + t) / (10 + t))`, a warm-up
so that the average of a short run (or the first steps of a long one) is not stuck near the
random initialisation; after about `10 / (1 - decay)` steps it is the plain EMA with `decay`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def init_ema(params: Any, decay: float) -> Any:
    """The EMA to start from: a copy of `params`, or None when `decay` is 0 (no EMA kept)."""
    return jax.tree.map(jnp.copy, params) if decay > 0 else None


def ema_decay(step: jax.Array, decay: float) -> jax.Array:
    """The decay used for the update after `step` optimizer steps (0 for the first update)."""
    t = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def ema_update(ema: Any, params: Any, step: jax.Array, decay: float) -> Any:
    """`ema` moved towards the new `params`: `d * ema + (1 - d) * params` with
    `d = ema_decay(step, decay)`, where `step` counts the steps taken before this one. An absent
    EMA (None) stays absent, so a step calls this whether or not the run keeps one."""
    if ema is None:
        return None
    return optax.incremental_update(params, ema, 1.0 - ema_decay(step, decay))
