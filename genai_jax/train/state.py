"""The training state pytree and the generic gradient step every single-loss family shares."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# (params, batch, rng) -> (scalar loss, metrics)
LossFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, Metrics]]


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: a plain pytree, printable and checkpointable."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # nnx.State of the model's parameters (with logical-axis metadata)
    opt_state: optax.OptState
    ema: Any  # exponential moving average of params, or None
    rng: jax.Array  # uint32[2] base key; step keys are fold_in(rng, step)

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, rng: jax.Array,
               ema_decay: float = 0.0) -> TrainState:
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   ema=jax.tree.map(jnp.copy, params) if ema_decay > 0 else None, rng=rng)

    @property
    def eval_params(self):
        """The parameters to evaluate and sample with: the EMA when one is kept."""
        return self.params if self.ema is None else self.ema


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, accum_steps: int = 1,
                    ema_decay: float = 0.0, schedule: optax.Schedule | None = None):
    """`train_step(state, batch) -> (state, metrics)` for a family with one loss.

    With `accum_steps > 1` the batch's leading dimension is split into that many micro-batches
    whose gradients are averaged in a `lax.scan`, so only one micro-batch of activations is alive
    at a time; the update is the same as one step on the whole batch.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: Batch):
        rng = jax.random.fold_in(state.rng, state.step)
        if accum_steps == 1:
            (loss, metrics), grads = grad_fn(state.params, batch, rng)
        else:
            # Micro-batch i takes every accum_steps-th row, so each one stays spread over all
            # the data-parallel devices the batch is sharded over.
            micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum_steps, accum_steps,
                                                     *x.shape[1:]).swapaxes(0, 1), batch)

            def accumulate(total, inputs):
                i, mb = inputs
                out = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, total, out), None

            first = jax.tree.map(lambda x: x[0], micro)
            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, state.params, first, rng))
            total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum_steps), micro))
            (loss, metrics), grads = jax.tree.map(lambda x: x / accum_steps, total)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            ema = optax.incremental_update(params, ema, 1.0 - ema_decay)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
        return new_state, metrics

    return train_step
