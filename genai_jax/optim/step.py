"""The generic train step of a family with one loss: gradients, update, EMA, metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from genai_jax.optim.accumulate import accumulate_gradients
from genai_jax.optim.dp import DpSgd, private_gradients
from genai_jax.optim.ema import ema_update
from genai_jax.optim.federated import FedAvg, make_round_step
from genai_jax.optim.state import TrainState, with_frozen

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# (params, batch, rng) -> (scalar loss, metrics)
LossFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, Metrics]]


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, accum_steps: int = 1,
                    ema_decay: float = 0.0, schedule: optax.Schedule | None = None,
                    privacy: DpSgd | None = None, federated: FedAvg | None = None):
    """`train_step(state, batch) -> (state, metrics)` for a family with one loss.

    With `accum_steps > 1` the batch is split into that many micro-batches whose gradients are
    averaged (`accumulate_gradients`); the update is the same as one step on the whole batch.
    The EMA, when the state keeps one, follows `ema_update`'s warm-up rule. With `privacy`
    the gradient is DP-SGD's (`genai_jax.optim.dp`). With `federated` a step is a round of
    FedAvg (`genai_jax.optim.federated`) and `tx` the server's optimizer.
    """
    if federated is not None:
        return make_round_step(loss_fn, tx, federated, ema_decay=ema_decay)
    grad_fn = jax.value_and_grad(lambda p, b, r, frozen: loss_fn(with_frozen(p, frozen), b, r),
                                 has_aux=True)

    def train_step(state: TrainState, batch: Batch):
        rng = jax.random.fold_in(state.rng, state.step)
        # Gradients of the trained parameters only: frozen ones (a LoRA base) are constants.
        if privacy is not None:
            loss, metrics, grads = private_gradients(
                lambda p, b, r: loss_fn(with_frozen(p, state.frozen), b, r), state.params,
                batch, rng, privacy, accum_steps)
        else:
            grads_of = lambda p, b, r: grad_fn(p, b, r, state.frozen)
            (loss, metrics), grads = accumulate_gradients(grads_of, state.params, batch, rng,
                                                          accum_steps)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema, params, state.step, ema_decay)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
        return new_state, metrics

    return train_step
