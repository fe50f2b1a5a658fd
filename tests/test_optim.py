"""The pieces every family shares below the trainer: EMA warm-up, gradient accumulation, the
generic train step. Small exact problems, so the expected numbers are written out here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from genai_jax.optim import (
    TrainState,
    accumulate_gradients,
    ema_decay,
    ema_update,
    init_ema,
    make_train_step,
)


def test_ema_decay_warms_up_to_the_configured_decay():
    decays = [float(ema_decay(t, 0.999)) for t in (0, 1, 8, 100_000)]
    assert decays == pytest.approx([1 / 10, 2 / 11, 9 / 18, 0.999])
    assert float(ema_decay(0, 0.05)) == pytest.approx(0.05)  # a low decay is never raised


def test_ema_update_moves_towards_the_parameters():
    ema, params = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    np.testing.assert_allclose(ema_update(ema, params, 0, 0.9)["w"], 0.9)  # decay 1/10 at step 0
    np.testing.assert_allclose(ema_update(ema, params, 10**6, 0.9)["w"], 0.1, rtol=1e-6)
    assert ema_update(None, params, 0, 0.9) is None and init_ema(params, 0.0) is None
    np.testing.assert_array_equal(init_ema(params, 0.5)["w"], params["w"])


def _regression_grad_fn(params, batch, rng):
    """A mean squared error: its gradient on a batch is the mean of the per-example ones."""
    def loss_fn(w):
        loss = jnp.mean(jnp.square(batch["x"] @ w - batch["y"]))
        return loss, {}
    return jax.value_and_grad(loss_fn, has_aux=True)(params)


def test_accumulated_gradients_equal_the_whole_batch_ones():
    rng = np.random.default_rng(0)
    batch = {"x": rng.standard_normal((12, 3)).astype(np.float32),
             "y": rng.standard_normal(12).astype(np.float32)}
    w, key = jnp.asarray([0.5, -1.0, 2.0]), jax.random.PRNGKey(0)
    (loss, _), grads = accumulate_gradients(_regression_grad_fn, w, batch, key, 1)
    for steps in (2, 3, 4):
        (loss_k, _), grads_k = jax.jit(accumulate_gradients, static_argnums=(0, 4))(
            _regression_grad_fn, w, batch, key, steps)
        np.testing.assert_allclose(loss_k, loss, rtol=1e-6)
        np.testing.assert_allclose(grads_k, grads, rtol=1e-5, atol=1e-6)


def test_micro_batches_are_strided_rows_with_their_own_keys():
    batch = {"x": jnp.arange(12.0)}
    key = jax.random.PRNGKey(3)

    def rows_times_key(params, mb, rng):  # keeps which rows, and which key, each call saw
        return mb["x"] * jax.random.uniform(rng)

    out = accumulate_gradients(rows_times_key, None, batch, key, 3)
    expected = sum(np.arange(12.0)[i::3] * float(jax.random.uniform(jax.random.fold_in(key, i)))
                   for i in range(3)) / 3
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_allclose(accumulate_gradients(rows_times_key, None, batch, key, 1),
                               np.arange(12.0) * float(jax.random.uniform(key)), rtol=1e-6)


def test_train_step_updates_params_and_ema_by_the_shared_rule():
    tx = optax.sgd(0.1)
    state = TrainState.create({"w": jnp.ones(3)}, tx, jax.random.PRNGKey(0), ema_decay=0.99)

    def loss_fn(params, batch, rng):
        return jnp.mean(jnp.sum(jnp.square(params["w"] - batch["target"]), -1)), {}

    step = jax.jit(make_train_step(loss_fn, tx, accum_steps=2, ema_decay=0.99))
    batch = {"target": jnp.zeros((4, 3))}
    new, metrics = step(state, batch)
    np.testing.assert_allclose(new.params["w"], 1.0 - 0.1 * 2.0)  # d/dw |w - 0|^2 = 2w
    np.testing.assert_allclose(new.ema["w"], 0.1 * 1.0 + 0.9 * 0.8)  # decay 1/10 at step 0
    assert int(new.step) == 1 and float(metrics["loss"]) == pytest.approx(3.0)
    new, _ = step(new, batch)
    d = 2 / 11  # the decay after one step
    np.testing.assert_allclose(new.ema["w"], d * 0.82 + (1 - d) * 0.64, rtol=1e-6)
