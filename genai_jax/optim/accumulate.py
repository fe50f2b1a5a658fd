"""Gradient accumulation inside the compiled step: a batch as micro-batches in a `lax.scan`.

Inside the step (not `optax.MultiSteps`, which spreads one update over several calls) so that
one call is still one optimizer update, and so that a gradient function which aggregates
per-example gradients (DP-SGD's clipping) composes with it: it is called once per micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# (params, batch, rng) -> any pytree of arrays, typically ((loss, metrics), grads)
GradFn = Callable[[Any, dict, jax.Array], Any]


def accumulate_gradients(grad_fn: GradFn, params: Any, batch: dict, rng: jax.Array,
                         steps: int, mean: bool = True) -> Any:
    """`grad_fn(params, batch, rng)`'s outputs averaged (`mean=False`: summed) over `steps`
    micro-batches of `batch`.

    Micro-batch i takes every `steps`-th row starting at row i, so each one stays spread over all
    the data-parallel devices the batch is sharded over, and gets the key `fold_in(rng, i)`.
    Only one micro-batch's activations are alive at a time. When `grad_fn` averages over its
    batch (a mean loss), the result is its value on the whole batch; `steps == 1` is exactly one
    call with `rng` itself.
    """
    if steps == 1:
        return grad_fn(params, batch, rng)
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // steps, steps, *x.shape[1:])
                         .swapaxes(0, 1), batch)

    def add(total, inputs):
        i, mb = inputs
        return jax.tree.map(jnp.add, total, grad_fn(params, mb, jax.random.fold_in(rng, i))), None

    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, first, rng))
    total, _ = jax.lax.scan(add, zeros, (jnp.arange(steps), micro))
    return jax.tree.map(lambda x: x / steps, total) if mean else total
