"""The GAN family: a generator G and a discriminator D trained against each other.

One compiled `train_step` updates both parameter sets, alternating: first D on a real batch and
`G(z)`, then G against the updated D with the same z. Losses (`model.loss`): "non_saturating"
(D: softplus cross-entropy, G: -log D(G(z))) and "hinge" (D: relu(1 -+ logits), G: -D(G(z))).
D is kept smooth by `model.regularization`: "r1" (Mescheder et al. 2018: `r1_gamma / 2 *
E||grad_x D(x)||^2` on real data, lazily every `r1_every` steps with the weight scaled by it),
"spectral_norm" (Miyato et al. 2018: every D weight divided by its largest singular value, one
power-iteration step per training step on vectors kept in `GANState.sn_state`) or "none".
Both networks use Adam with constant learning rates (`model.g_learning_rate`,
`model.d_learning_rate`, betas `model.b1`, `model.b2`); `train.learning_rate`, the schedule,
weight decay and clipping of `train.*` are not used. `train.ema_decay > 0` keeps an exponential
moving average of G, which `generate` (samples and evaluation) uses, with the warm-up every family
shares (`genai_jax.optim.ema`).

`train.grad_accum_steps > 1` accumulates both networks' gradients over micro-batches, as every
family does (`genai_jax.optim.accumulate`): the latents are drawn for the whole batch first and
split with it, so the step is the one on the whole batch. G runs forward twice per
(micro-)batch, once for D's fakes and once for its own gradient: reusing the first forward's
pullback would keep every micro-batch's activations alive until the G step. That costs about 6%
more FLOPs per step at `gan_digits` sizes (XLA's cost analysis on CPU) than one forward.

Networks (`genai_jax.models.gan_nets`): DCGAN-style convolutional G and D for images, MLPs for
2-D points; class-conditional runs give G a label embedding and make D a projection
discriminator.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from genai_jax import config_checks as config_lib
from genai_jax import parallel
from genai_jax.config_checks import ConfigError
from genai_jax.models import images
from genai_jax.models.family import Family
from genai_jax.models.gan_nets import (
    Discriminator,
    NetConfig,
    SpectralVector,
    make_generator,
    power_iteration,
)
from genai_jax.optim import accumulate_gradients, ema_update, init_ema, privacy_from_config
from genai_jax.optim.dp import private_gradients

LOSSES = ("non_saturating", "hinge")
REGULARIZATIONS = ("r1", "spectral_norm", "none")
_EVAL_STREAM = 1  # eval fakes use fold_in(step key, _EVAL_STREAM): never a training key


def config_defaults() -> dict:
    return {
        "model": dict(conditional=False, z_dim=64, g_channels=32, d_channels=32, hidden=128,
                      mlp_layers=3, label_dim=32, g_norm="pixelnorm", loss="non_saturating",
                      regularization="r1", r1_gamma=1.0, r1_every=1, g_learning_rate=2e-4,
                      d_learning_rate=2e-4, b1=0.5, b2=0.99, dtype="float32"),
        "sample": dict(num_samples=100),
        "eval": dict(num_samples=1000),
    }


def validate(config) -> None:
    m = config.model
    config_lib.check_choices(config, {
        "model.loss": LOSSES,
        "model.regularization": REGULARIZATIONS,
        "model.g_norm": ("pixelnorm", "none"),
        "model.dtype": ("float32",),
    })
    config_lib.check_positive(config, (
        "model.z_dim", "model.g_channels", "model.d_channels", "model.hidden", "model.mlp_layers",
        "model.label_dim", "model.g_learning_rate", "model.d_learning_rate", "model.r1_every"))
    if m.r1_gamma < 0:
        raise ConfigError(f"model.r1_gamma={m.r1_gamma} must be >= 0")
    if not (0.0 <= m.b1 < 1.0 and 0.0 <= m.b2 < 1.0):
        raise ConfigError(f"model.b1={m.b1} and model.b2={m.b2} (Adam betas) must be in [0, 1)")


@flax.struct.dataclass
class GANState:
    """Everything a GAN run needs to continue: a plain, checkpointable pytree."""

    step: jax.Array  # int32 scalar: training steps taken (one D and one G update each)
    g_params: Any  # nnx.State of G's parameters (with logical-axis metadata)
    d_params: Any  # nnx.State of D's parameters
    g_opt_state: optax.OptState
    d_opt_state: optax.OptState
    g_ema: Any  # exponential moving average of g_params, or None
    sn_state: Any  # nnx.State of D's SpectralVectors (power-iteration u), or None
    rng: jax.Array  # uint32[2] base key; step keys are fold_in(rng, step)

    @property
    def g_eval_params(self):
        """G's parameters to sample with: the EMA when one is kept."""
        return self.g_params if self.g_ema is None else self.g_ema


def net_config(config, data_info: dict) -> NetConfig:
    m = config.model
    return NetConfig(shape=tuple(data_info["shape"]), z_dim=m.z_dim, g_channels=m.g_channels,
                     d_channels=m.d_channels, hidden=m.hidden, mlp_layers=m.mlp_layers,
                     num_classes=data_info["num_classes"] if m.conditional else 0,
                     label_dim=m.label_dim, g_norm=m.g_norm,
                     spectral_norm=m.regularization == "spectral_norm")


def d_loss_terms(loss: str, real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """D's adversarial loss (scalar) from its logits on real and generated examples."""
    if loss == "hinge":
        return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))
    return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))


def g_loss_terms(loss: str, fake_logits: jax.Array) -> jax.Array:
    """G's adversarial loss (scalar) from D's logits on its samples."""
    if loss == "hinge":
        return -jnp.mean(fake_logits)
    return jnp.mean(jax.nn.softplus(-fake_logits))  # non-saturating: -log sigmoid(D(G(z)))


def r1_penalty(discriminator, x: jax.Array, labels: jax.Array) -> jax.Array:
    """`E_x ||grad_x D(x, y)||^2` over the batch, for `discriminator(x, labels) -> [batch]`."""
    grads = jax.grad(lambda x: jnp.sum(discriminator(x, labels)))(x)
    return jnp.mean(jnp.sum(jnp.square(grads.reshape(grads.shape[0], -1)), axis=-1))


def build(config, data_info: dict) -> Family:
    """The GAN family for `config` on data described by `data_info` (`models.images`)."""
    images.check_conditional(config, data_info)
    m, ema_decay, accum_steps = config.model, config.train.ema_decay, config.train.grad_accum_steps
    cfg = net_config(config, data_info)
    g_graph = nnx.split(nnx.eval_shape(lambda: make_generator(cfg, rngs=nnx.Rngs(0))))[0]
    d_graph = nnx.split(nnx.eval_shape(lambda: Discriminator(cfg, rngs=nnx.Rngs(0))),
                        nnx.Param, SpectralVector)[0]
    g_tx = optax.adam(m.g_learning_rate, b1=m.b1, b2=m.b2)
    d_tx = optax.adam(m.d_learning_rate, b1=m.b1, b2=m.b2)
    # DP-SGD trains D, the only network that sees the data, on per-example gradients (its R1
    # penalty included); G learns from the private D only, with labels of its own.
    privacy = privacy_from_config(config, data_info)

    def generator(params, z, labels):
        return nnx.merge(g_graph, params)(z, labels)

    def discriminator(params, sn_state, x, labels):
        extra = () if sn_state is None else (sn_state,)
        return nnx.merge(d_graph, params, *extra)(x, labels)

    def init(rng: jax.Array) -> GANState:
        g_rng, d_rng, state_rng = jax.random.split(rng, 3)
        g_params = nnx.state(make_generator(cfg, rngs=nnx.Rngs(params=g_rng)), nnx.Param)
        d = Discriminator(cfg, rngs=nnx.Rngs(params=d_rng))
        _, d_params, sn_state = nnx.split(d, nnx.Param, SpectralVector)
        return GANState(
            step=jnp.zeros((), jnp.int32), g_params=g_params, d_params=d_params,
            g_opt_state=g_tx.init(g_params), d_opt_state=d_tx.init(d_params),
            g_ema=init_ema(g_params, ema_decay),
            sn_state=sn_state if cfg.spectral_norm else None, rng=state_rng)

    def advance_spectral_vectors(d_params, sn_state):
        if sn_state is None:
            return None
        d = nnx.merge(d_graph, d_params, sn_state)
        power_iteration(d)
        return nnx.state(d, SpectralVector)

    def train_step(state: GANState, batch) -> tuple[GANState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        # Latents for the whole batch, split with it: accumulation does not change the step.
        batch = {**batch, "z": jax.random.normal(rng, (batch["label"].shape[0], cfg.z_dim))}
        sn_state = advance_spectral_vectors(state.d_params, state.sn_state)

        def d_loss_fn(d_params, real, fake, labels):
            logits = discriminator(d_params, sn_state, jnp.concatenate([real, fake]),
                                   jnp.concatenate([labels, labels]))
            real_logits, fake_logits = jnp.split(logits, 2)
            loss = d_loss_terms(m.loss, real_logits, fake_logits)
            aux = {"d_real": jnp.mean(real_logits), "d_fake": jnp.mean(fake_logits)}
            if m.regularization == "r1":
                penalty = jax.lax.cond(
                    state.step % m.r1_every == 0,
                    lambda: r1_penalty(lambda x, y: discriminator(d_params, sn_state, x, y), real,
                                       labels),
                    lambda: jnp.zeros(()))
                loss = loss + 0.5 * m.r1_gamma * m.r1_every * penalty
                aux["r1"] = penalty
            return loss, aux

        def d_loss_of_batch(d_params, mb, _):
            # Fakes get the real batch's labels, so both see the same class frequencies.
            fake = generator(state.g_params, mb["z"], mb["label"])
            return d_loss_fn(d_params, images.to_model(mb["x"]), fake, mb["label"])

        if privacy is None:
            (d_loss, d_aux), d_grads = accumulate_gradients(
                jax.value_and_grad(d_loss_of_batch, has_aux=True), state.d_params, batch, rng,
                accum_steps)
            g_batch = batch
        else:
            d_loss, d_aux, d_grads = private_gradients(d_loss_of_batch, state.d_params, batch,
                                                       rng, privacy, accum_steps)
            # The batch's labels are private: G's step draws its own, uniformly.
            g_labels = (jax.random.randint(jax.random.fold_in(rng, 1), batch["label"].shape, 0,
                                           cfg.num_classes) if cfg.num_classes else
                        jnp.zeros_like(batch["label"]))
            g_batch = {"z": batch["z"], "label": g_labels}
        d_updates, d_opt_state = d_tx.update(d_grads, state.d_opt_state, state.d_params)
        d_params = optax.apply_updates(state.d_params, d_updates)

        def g_grad_fn(g_params, mb, _):  # G against the updated D, on the same latents
            return jax.value_and_grad(lambda p: g_loss_terms(m.loss, discriminator(
                d_params, sn_state, generator(p, mb["z"], mb["label"]), mb["label"])))(g_params)

        g_loss, g_grads = accumulate_gradients(g_grad_fn, state.g_params, g_batch, rng,
                                               accum_steps)
        g_updates, g_opt_state = g_tx.update(g_grads, state.g_opt_state, state.g_params)
        g_params = optax.apply_updates(state.g_params, g_updates)

        metrics = {"loss": d_loss + g_loss, "d_loss": d_loss, "g_loss": g_loss, **d_aux,
                   "grad_norm_d": optax.global_norm(d_grads),
                   "grad_norm_g": optax.global_norm(g_grads)}
        new_state = state.replace(step=state.step + 1, g_params=g_params, d_params=d_params,
                                  g_opt_state=g_opt_state, d_opt_state=d_opt_state,
                                  g_ema=ema_update(state.g_ema, g_params, state.step, ema_decay),
                                  sn_state=sn_state)
        return new_state, metrics

    def eval_step(state: GANState, batch) -> dict:
        """D on held-out real data and on fakes of the trained (not EMA) G, which D was trained
        against, so the numbers read against the training ones. eval_step sees no batch index:
        every eval batch gets the same z."""
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), _EVAL_STREAM)
        real, labels = images.to_model(batch["x"]), batch["label"]
        z = jax.random.normal(rng, (real.shape[0], cfg.z_dim))
        fake = generator(state.g_params, z, labels)
        real_logits = discriminator(state.d_params, state.sn_state, real, labels)
        fake_logits = discriminator(state.d_params, state.sn_state, fake, labels)
        d_loss = d_loss_terms(m.loss, real_logits, fake_logits)
        g_loss = g_loss_terms(m.loss, fake_logits)
        return {"loss": d_loss + g_loss, "d_loss": d_loss, "g_loss": g_loss,
                "d_real": jnp.mean(real_logits), "d_fake": jnp.mean(fake_logits)}

    extras = _extras(data_info, functools.partial(interpolate, g_graph, cfg))
    return images.make_family(config, data_info, init=init, train_step=train_step,
                              eval_step=eval_step,
                              generate=functools.partial(generate, g_graph, cfg.z_dim),
                              export_params=lambda state: state.g_eval_params, extras=extras)


def generate(g_graph, z_dim: int, params, rng: jax.Array, labels: jax.Array) -> jax.Array:
    """`len(labels)` samples of G with `params` (`GANState.g_eval_params`: the EMA when kept)
    in model range, from latents z ~ N(0, I) `[n, z_dim]` drawn from `rng`."""
    z = jax.random.normal(rng, (labels.shape[0], z_dim))
    return nnx.merge(g_graph, params)(z, labels)


def interpolate(g_graph, cfg: NetConfig, params, rng: jax.Array, rows: int,
                cols: int) -> jax.Array:
    """`[rows * cols, ...]`: each row walks linearly between two latents (row i of class i
    when conditional): a smooth walk shows that G did not memorise single images."""
    ends = jax.random.normal(rng, (2, rows, 1, cfg.z_dim))
    t = jnp.linspace(0.0, 1.0, cols)[None, :, None]
    z = ((1.0 - t) * ends[0] + t * ends[1]).reshape(rows * cols, cfg.z_dim)
    labels = jnp.repeat(jnp.arange(rows) % max(cfg.num_classes, 1), cols)
    return nnx.merge(g_graph, params)(z, labels)


def _extras(data_info: dict, interpolate_fn):
    """`extras(params, rng, directory, step)`: the interpolation grid (images only)."""
    rows, cols = data_info["num_classes"] or 10, 8
    interpolate_jit = jax.jit(functools.partial(interpolate_fn, rows=rows, cols=cols))

    def extras(params, rng, directory: pathlib.Path, step: int) -> dict[str, str]:
        if data_info["kind"] != "image":
            return {}
        x = parallel.fetch(interpolate_jit(params, rng))
        path = directory / f"interpolation_{step:08d}.png"
        return {"interpolation": images.save_png(images.grid(images.to_uint8(x), cols), path)}

    return extras
