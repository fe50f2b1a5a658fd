"""Federated averaging: the selected clients' local training, then the server's update.

A round (one trainer step) reads `slots x local_steps x local_batch` rows
(`genai_jax.data.federated`): slot c holds the local batches of one client of the round. Every
client starts from the server's parameters and takes `local_steps` steps of SGD or Adam at
`client_lr` (its gradient clipped to `train.grad_clip` first, when set) on its own batches. A
client keeps no state between rounds: Adam's moments start fresh every round, or, with
`client_moments='averaged'`, from the server's, which the server keeps as the average of the
round's clients' final moments (the clients' optimizer state averaged like their parameters;
not under DP-FedAvg, where the moments would carry the clients' data without noise). The
clients run as one compiled function, `vmap` over the slots (which split over the data-parallel
devices as the rows do), so a client's computation reads its own rows only. A client's update
is the change of its parameters. The server averages the updates, weighted as the rows'
`client_weight` says (FedAvg, McMahan et al., 2017: by the clients' amounts of data; equally
when the clients were drawn in proportion to them), and applies the average as a negative
gradient with its optimizer: `fedavg` (SGD; at server_lr 1 the average itself) or `fedadam`
(Adam: Reddi et al., "Adaptive Federated Optimization", 2021).

Under `train.privacy` the round is user-level DP-FedAvg (McMahan et al., "Learning
Differentially Private Recurrent Language Models", 2018): every client's update is clipped to
`clip_norm` (jax-privacy's `clip_pytree`), the round's clipped updates are summed with equal
weights, Gaussian noise of std `noise_multiplier * clip_norm` is added once, and the sum is
divided by the expected number of clients per round: a Gaussian mechanism over
Poisson-sampled clients per round, which the accountant counts.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax_privacy.clipping import clip_pytree

from genai_jax import parallel
from genai_jax.config_checks import federated_enabled, privacy_enabled
from genai_jax.optim.ema import ema_update
from genai_jax.optim.state import TrainState, with_frozen

MASK, WEIGHT = "client_mask", "client_weight"  # as `genai_jax.data.federated` writes them


@dataclasses.dataclass(frozen=True)
class FedAvg:
    local_steps: int
    local_batch: int
    client_lr: float
    expected_clients: int  # clients_per_round: DP-FedAvg's sum is divided by it
    grad_clip: float = 0.0  # of each local step's gradient (0: off)
    client_optimizer: str = "sgd"  # or "adam", its moments fresh every round
    # the clients' learning rate by round (default: client_lr throughout)
    client_schedule: optax.Schedule | None = None
    clip_norm: float = 0.0  # of each client's update: DP-FedAvg when > 0
    noise_multiplier: float = 0.0
    averaged_moments: bool = False  # Adam's moments carried by the server (`FedOptState`)

    @property
    def private(self) -> bool:
        return self.clip_norm > 0


def from_config(config, data_info: dict) -> FedAvg | None:
    """The round of `config.train.federated` (None when training is centralised); under
    `train.privacy` DP-FedAvg, its noise multiplier as the trainer resolved it."""
    if not federated_enabled(config):
        return None
    t, fed = config.train, config.train.federated
    clip = noise = 0.0
    if privacy_enabled(config):
        clip = t.privacy.clip_norm
        noise = data_info.get("noise_multiplier", t.privacy.noise_multiplier) or 0.0
    return FedAvg(fed.local_steps, t.batch_size, fed.client_lr, fed.clients_per_round,
                  t.grad_clip, fed.client_optimizer, client_schedule(config), clip, float(noise),
                  fed.client_moments == "averaged")


def client_schedule(config) -> optax.Schedule | None:
    """`train.federated.client_lr_schedule`: "constant" (None), or "cosine": a linear warm-up
    over `train.warmup_steps` rounds, then a cosine decay to a tenth of `client_lr` at the last
    round."""
    fed, steps = config.train.federated, config.train.steps
    if fed.client_lr_schedule == "constant":
        return None
    warmup = min(config.train.warmup_steps, steps)
    return optax.warmup_cosine_decay_schedule(0.0, fed.client_lr, warmup,
                                              max(steps, warmup + 1), fed.client_lr / 10)


class FedOptState(NamedTuple):
    """The server's optimizer state with `client_moments='averaged'`: its own, and the Adam
    moments every round's clients start from."""

    server: optax.OptState
    client: optax.ScaleByAdamState


def _client_adam() -> optax.GradientTransformation:
    return optax.scale_by_adam(b1=0.9, b2=0.99)


def server_optimizer(fed_cfg) -> optax.GradientTransformation:
    """The server's optimizer of the averaged client update (as a negative gradient); with
    `client_moments='averaged'` its state is a `FedOptState`, whose clients' moments the round
    step (not this transformation) replaces."""
    if fed_cfg.server_optimizer == "fedadam":
        # Reddi et al.'s FedAdam: its adaptivity eps (tau) is large, 1e-3.
        tx = optax.adam(fed_cfg.server_lr, b1=0.9, b2=0.99, eps=1e-3)
    else:
        # FedAvgM (Hsu et al., 2019) with a momentum: Nesterov's, as DiLoCo's outer optimizer.
        momentum = fed_cfg.get("server_momentum", 0.0)
        tx = optax.sgd(fed_cfg.server_lr, momentum=momentum or None, nesterov=momentum > 0)
    if fed_cfg.get("client_moments", "fresh") != "averaged":
        return tx

    def init(params):
        return FedOptState(tx.init(params), _client_adam().init(params))

    def update(updates, state, params=None):
        updates, server = tx.update(updates, state.server, params)
        return updates, state._replace(server=server)

    return optax.GradientTransformation(init, update)


def client_updates(grad_fn, params, rows: dict, rng: jax.Array, fed: FedAvg,
                   client_lr: jax.Array | float | None = None,
                   moments: optax.ScaleByAdamState | None = None):
    """`(updates, losses, metrics, moments)`: every slot's client update (a pytree like
    `params` with a leading `[slots]` axis), mean local loss `[slots]`, mean family metrics
    `[slots]`, and (when `moments`, the Adam moments to start from, are given) the final
    moments of every slot.

    `grad_fn(params, batch, rng) -> ((loss, metrics), grads)`; `rows` are the round's rows
    without the client mask and weight; slot c's key is `fold_in(rng, c)`, its local step i's
    `fold_in(that, i)`. `client_lr`: this round's (default `fed.client_lr`).
    """
    lr = fed.client_lr if client_lr is None else client_lr
    per_client = fed.local_steps * fed.local_batch
    slots = next(iter(rows.values())).shape[0] // per_client
    clients = jax.tree.map(
        lambda x: x.reshape(slots, fed.local_steps, fed.local_batch, *x.shape[1:]), rows)
    clip = optax.clip_by_global_norm(fed.grad_clip) if fed.grad_clip > 0 else optax.identity()
    adam = fed.client_optimizer == "adam"
    # (clip, adam's moments, the step) so that the moments can start from `moments`
    local_tx = optax.chain(clip, _client_adam() if adam else optax.identity(),
                           optax.scale_by_learning_rate(lr))

    def local_training(batches, key):
        def local_step(carry, inputs):
            p, opt_state = carry
            i, batch = inputs
            (loss, metrics), grads = grad_fn(p, batch, jax.random.fold_in(key, i))
            updates, opt_state = local_tx.update(grads, opt_state, p)
            return (optax.apply_updates(p, updates), opt_state), (loss, metrics)

        start = local_tx.init(params)
        if moments is not None:
            start = (start[0], moments, start[2])
        (trained, end), (losses, metrics) = jax.lax.scan(
            local_step, (params, start), (jnp.arange(fed.local_steps), batches))
        update = jax.tree.map(jnp.subtract, trained, params)
        return update, losses.mean(), jax.tree.map(jnp.mean, metrics), end[1]

    keys = jax.vmap(lambda c: jax.random.fold_in(rng, c))(jnp.arange(slots))
    with parallel.unconstrained():  # the model's batch here is one client's: see there
        updates, losses, metrics, ends = jax.vmap(local_training)(clients, keys)
    return updates, losses, metrics, (ends if moments is not None else None)


def _weighted_sum(tree, weights: jax.Array):
    return jax.tree.map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), tree)


def _weighted_mean(tree, weights: jax.Array):
    total = jnp.maximum(jnp.sum(weights), 1e-12)
    return jax.tree.map(lambda s: s / total, _weighted_sum(tree, weights))


def make_round_step(loss_fn, tx: optax.GradientTransformation, fed: FedAvg, *,
                    ema_decay: float = 0.0):
    """`round_step(state, batch) -> (state, metrics)`: one round of FedAvg (DP-FedAvg when
    `fed.private`) for a family with one loss `loss_fn(params, batch, rng) -> (loss,
    metrics)`; `tx` is the server's optimizer (`server_optimizer`). Metrics: the clients' mean
    local loss (and family metrics), `clients` (how many took part), `update_norm` (of the
    server's averaged update), under DP-FedAvg `clipped_fraction` (of the client updates)."""
    grad_fn = jax.value_and_grad(lambda p, b, r, frozen: loss_fn(with_frozen(p, frozen), b, r),
                                 has_aux=True)

    def round_step(state: TrainState, batch: dict):
        client_rng, noise_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
        rows = {k: v for k, v in batch.items() if k not in (MASK, WEIGHT)}
        client_lr = None if fed.client_schedule is None else fed.client_schedule(state.step)
        start = state.opt_state.client if fed.averaged_moments else None
        updates, losses, metrics, moments = client_updates(
            lambda p, b, r: grad_fn(p, b, r, state.frozen), state.params, rows, client_rng,
            fed, client_lr, start)
        slots = losses.shape[0]
        mask = batch[MASK].reshape(slots, -1)[:, 0]
        count = jnp.sum(mask)
        extra = {}
        if fed.private:
            clipped, norms = jax.vmap(lambda u: clip_pytree(u, fed.clip_norm))(updates)
            total = _weighted_sum(clipped, mask)
            noise = optax.tree.random_like(noise_rng, total, jax.random.normal)
            std = fed.noise_multiplier * fed.clip_norm
            average = jax.tree.map(lambda s, z: (s + std * z) / fed.expected_clients, total,
                                   noise)
            extra["clipped_fraction"] = jnp.sum((norms > fed.clip_norm) * mask) / jnp.maximum(
                count, 1.0)
            weights = mask
        else:
            weights = mask * batch[WEIGHT].reshape(slots, -1)[:, 0]
            average = _weighted_mean(updates, weights)
        mean = lambda v: _weighted_mean(v, weights)
        server_grad = jax.tree.map(jnp.negative, average)
        step_updates, opt_state = tx.update(server_grad, state.opt_state, state.params)
        if fed.averaged_moments:  # the round's clients' moments, averaged as their updates
            opt_state = opt_state._replace(client=start._replace(
                count=start.count + fed.local_steps, mu=_weighted_mean(moments.mu, weights),
                nu=_weighted_mean(moments.nu, weights)))
        params = optax.apply_updates(state.params, step_updates)
        ema = ema_update(state.ema, params, state.step, ema_decay)
        metrics = {**{k: mean(v) for k, v in metrics.items()}, **extra, "loss": mean(losses),
                   "clients": count, "update_norm": optax.global_norm(average)}
        if client_lr is not None:
            metrics["client_lr"] = client_lr
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             ema=ema), metrics

    return round_step
