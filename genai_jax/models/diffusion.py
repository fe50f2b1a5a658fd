"""The diffusion family: a denoiser trained on the DDPM objective, sampled with DDIM or DDPM.

Training (Ho et al. 2020): x0 in [-1, 1], t ~ U{0..T-1}, eps ~ N(0, I),
x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, and the loss is the mean squared
error of the network's output against eps (`model.prediction="eps"`) or against
v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 ("v"). `model.loss_weighting` weights
the rows: "uniform" is Ho et al.'s simple loss, which in x0 terms weights each step by its SNR,
so the nearly clean steps dominate; "min_snr" (Min-SNR-gamma, Hang et al. 2023) caps that
weight at `model.min_snr_gamma` (`sampling.diffusion.loss_weights`). A class-conditional model
sees the "no label" class (index num_classes) for a `model.label_dropout` fraction of rows,
which trains the unconditional model that classifier-free guidance needs.

Sampling (`genai_jax.sampling.diffusion`): the EMA weights (when `train.ema_decay` > 0),
`sample.sampler` "ddim" or "ddpm" over `sample.steps` timesteps, CFG weight `sample.guidance`
on the steps with t < `sample.guidance_max_t` T, `sample.clip_x0` (images only: 2-D points are
not in [-1, 1], and need v-prediction).
`model.kernels="pallas"` uses the fused Pallas GroupNorm-modulate-SiLU in the UNet and the fused
sampler step.

Evaluation: the same loss of the EMA weights (when kept) on held-out batches, row i of a
batch at the fixed timestep round(i (T-1) / (n-1)) with fixed noise, overall ("loss") and per
quarter of [0, T) ("loss_t0" is the least noisy), unweighted so that runs with different
`model.loss_weighting` compare. Extras: a PNG strip of the predicted x0 of
a few samples at `sample.trajectory_steps` evenly spaced sampler steps (rows = samples,
columns = steps).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from genai_jax import config_checks as config_lib
from genai_jax import parallel
from genai_jax.config_checks import ConfigError
from genai_jax.models import images
from genai_jax.models.family import Family
from genai_jax.nn import IMPLEMENTATIONS, REMAT_POLICIES
from genai_jax.nn.unet import UNetConfig, make_denoiser
from genai_jax.optim import (
    TrainState,
    federated_from_config,
    learning_rate_schedule,
    make_optimizer,
    make_train_step,
    privacy_from_config,
)
from genai_jax.sampling import diffusion as diff

EVAL_NOISE_SEED = 1234  # the held-out loss uses the same noise at every evaluation


def config_defaults() -> dict:
    return {
        "model": dict(conditional=False, prediction="eps", schedule="cosine",
                      num_timesteps=1000, loss_weighting="uniform", min_snr_gamma=5.0,
                      channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
                      attention_max_side=8, num_heads=4, groups=8, label_dropout=0.1,
                      kernels="xla", attention="xla", mlp_width=256, mlp_depth=3,
                      remat="none", dtype="float32"),
        "sample": dict(num_samples=100, sampler="ddim", steps=50, eta=0.0, guidance=1.0,
                       guidance_max_t=1.0, clip_x0=True, trajectory_samples=8,
                       trajectory_steps=8),
        "eval": dict(num_samples=1000, timestep_buckets=4),
    }


def validate(config) -> None:
    m, s = config.model, config.sample
    config_lib.check_choices(config, {
        "model.prediction": diff.PREDICTIONS,
        "model.schedule": diff.SCHEDULES,
        "model.loss_weighting": diff.LOSS_WEIGHTINGS,
        "model.kernels": diff.KERNELS,
        "model.remat": tuple(REMAT_POLICIES),
        "model.attention": IMPLEMENTATIONS,
        "model.dtype": ("float32", "bfloat16"),
        "sample.sampler": diff.SAMPLERS,
    })
    config_lib.check_positive(config, (
        "model.num_timesteps", "model.min_snr_gamma", "model.channels", "model.num_res_blocks",
        "model.num_heads", "model.groups", "model.mlp_width", "model.mlp_depth",
        "sample.trajectory_samples", "sample.trajectory_steps", "eval.timestep_buckets"))
    if not m.channel_mult or min(m.channel_mult) <= 0:
        raise ConfigError(f"model.channel_mult={tuple(m.channel_mult)} must be a non-empty "
                          "tuple of positive multipliers, e.g. (1, 2, 2)")
    for width in {m.channels * k for k in m.channel_mult}:
        if width % m.groups:
            raise ConfigError(f"model.groups={m.groups} must divide every level's width "
                              f"(model.channels * model.channel_mult: {width})")
        if m.attention_max_side and width % m.num_heads:
            raise ConfigError(f"model.num_heads={m.num_heads} must divide every level's width "
                              f"({width}) when attention is on (model.attention_max_side > 0)")
    if not 0.0 <= m.label_dropout < 1.0:
        raise ConfigError(f"model.label_dropout={m.label_dropout} must be in [0, 1)")
    if s.steps < 0 or s.eta < 0 or s.guidance < 0:
        raise ConfigError("sample.steps (0 = all model.num_timesteps), sample.eta and "
                          "sample.guidance must be >= 0")
    if not 0.0 <= s.guidance_max_t <= 1.0:
        raise ConfigError(f"sample.guidance_max_t={s.guidance_max_t} must be in [0, 1] (guide "
                          "the steps with t < guidance_max_t * T; 1 = every step)")
    if m.conditional and s.guidance != 1.0 and m.label_dropout == 0.0:
        raise ConfigError(f"sample.guidance={s.guidance} needs the unconditional model, which "
                          "only label dropout trains: set model.label_dropout > 0 (e.g. 0.1) "
                          "or sample.guidance=1")


def unet_config(config, data_info: dict) -> UNetConfig:
    fields = {f.name for f in dataclasses.fields(UNetConfig)} - {"shape", "num_classes"}
    kwargs = {k: v for k, v in config.model.items() if k in fields}
    kwargs["channel_mult"] = tuple(kwargs["channel_mult"])
    return UNetConfig(shape=tuple(data_info["shape"]),
                      num_classes=data_info["num_classes"] if config.model.conditional else 0,
                      **kwargs)


def build(config, data_info: dict) -> Family:
    """The diffusion family for `config` on data described by `data_info` (see images.py)."""
    images.check_conditional(config, data_info)
    m, s = config.model, config.sample
    cfg = unet_config(config, data_info)
    kind, shape = data_info["kind"], tuple(data_info["shape"])
    if kind == "points" and m.prediction == "eps":
        # x0 = (x_t - s eps) / a multiplies eps's error by s / a (~2e4 at the cosine schedule's
        # last step); images clip x0 to [-1, 1], points have no range to clip to (measured on
        # ring8: eps-prediction samples diverge, v-prediction covers all 8 modes).
        raise ConfigError(f"data.name={config.data.name!r} is 2-D points, whose samples diverge "
                          "with eps-prediction: set --config.model.prediction=v")
    conditional, num_classes = m.conditional, data_info["num_classes"]
    schedule = diff.make_schedule(m.schedule, m.num_timesteps)
    tx = make_optimizer(config.train)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: make_denoiser(cfg, nnx.Rngs(0))))

    def init(rng: jax.Array) -> TrainState:
        params_rng, state_rng = jax.random.split(rng)
        params = nnx.state(make_denoiser(cfg, nnx.Rngs(params=params_rng)), nnx.Param)
        return TrainState.create(params, tx, state_rng, config.train.ema_decay)

    denoiser = functools.partial(make_denoiser_fn, graphdef, conditional)

    def losses(params, batch, t, noise, labels) -> jax.Array:
        """Per-row mean squared error `[n]` at timesteps t with the given noise and labels."""
        x0 = images.to_model(batch["x"])
        out = denoiser(params)(diff.q_sample(schedule, x0, t, noise), t, labels)
        target = diff.training_target(m.prediction, schedule, x0, t, noise)
        err = jnp.square(out.astype(jnp.float32) - target)
        return err.reshape(err.shape[0], -1).mean(axis=1)

    def loss_fn(params, batch, rng):
        n = batch["x"].shape[0]
        t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
        t = jax.random.randint(t_rng, (n,), 0, m.num_timesteps)
        noise = jax.random.normal(noise_rng, (n, *shape))
        labels = batch["label"]
        if conditional:  # classifier-free guidance: train the null class on some rows
            drop = jax.random.bernoulli(drop_rng, m.label_dropout, (n,))
            labels = jnp.where(drop, num_classes, labels)
        weights = diff.loss_weights(m.loss_weighting, m.prediction, schedule, t,
                                    m.min_snr_gamma)
        return (weights * losses(params, batch, t, noise, labels)).mean(), {}

    def eval_step(state: TrainState, batch) -> dict:
        params = state.eval_params
        n = batch["x"].shape[0]
        t = jnp.round(jnp.linspace(0, m.num_timesteps - 1, n)).astype(jnp.int32)
        noise = jax.random.normal(jax.random.PRNGKey(EVAL_NOISE_SEED), (n, *shape))
        per_row = losses(params, batch, t, noise, batch["label"])
        metrics = {"loss": per_row.mean()}
        buckets = config.eval.timestep_buckets
        bucket = t * buckets // m.num_timesteps
        for b in range(buckets):
            mask = bucket == b
            metrics[f"loss_t{b}"] = (jnp.sum(per_row * mask) / jnp.maximum(jnp.sum(mask), 1))
        return metrics

    sampler_kwargs = dict(null_label=num_classes, sampler=s.sampler, steps=s.steps, eta=s.eta,
                          guidance=s.guidance, guidance_max_t=s.guidance_max_t,
                          clip_x0=s.clip_x0 and kind == "image", prediction=m.prediction,
                          kernels=m.kernels)
    sample_fn = functools.partial(generate, graphdef, schedule, shape, conditional,
                                  sampler_kwargs)
    return images.make_family(
        config, data_info, init=init,
        train_step=make_train_step(loss_fn, tx, accum_steps=config.train.grad_accum_steps,
                                   ema_decay=config.train.ema_decay,
                                   schedule=learning_rate_schedule(config.train),
                                   privacy=privacy_from_config(config, data_info),
                                   federated=federated_from_config(config, data_info)),
        eval_step=eval_step, generate=sample_fn, extras=_extras(config, data_info, sample_fn))


def make_denoiser_fn(graphdef, conditional: bool, params):
    """`(x_t, t, labels) -> output` of the network with `params` (labels dropped when the
    model is unconditional)."""
    model = nnx.merge(graphdef, params)
    return lambda x, t, labels: model(x, t, labels if conditional else None)


def generate(graphdef, schedule, shape: tuple[int, ...], conditional: bool,
             sampler_kwargs: dict, params, rng: jax.Array, labels: jax.Array,
             trajectory: bool = False):
    """`len(labels)` samples `[n, *shape]` in model range from the denoiser with `params` (the
    eval params), by `diff.sample` with `sampler_kwargs` (sampler, steps, guidance, ...); with
    `trajectory`, also the predicted x0 after every step."""
    return diff.sample(make_denoiser_fn(graphdef, conditional, params), schedule,
                       (labels.shape[0], *shape), rng, labels=labels if conditional else None,
                       trajectory=trajectory, **sampler_kwargs)


def _extras(config, data_info: dict, sample_fn):
    """`extras(params, rng, directory, step)`: a strip of the predicted x0 of a few samples at
    `sample.trajectory_steps` sampler steps (images only)."""
    s, shape = config.sample, tuple(data_info["shape"])
    trajectory_jit = jax.jit(functools.partial(sample_fn, trajectory=True))

    def extras(params, rng, directory: pathlib.Path, step: int) -> dict[str, str]:
        if data_info["kind"] != "image":
            return {}
        labels = images.default_labels(s.trajectory_samples, data_info["num_classes"])
        _, path = trajectory_jit(params, jax.random.fold_in(rng, 1), jnp.asarray(labels))
        columns = np.unique(np.round(np.linspace(0, path.shape[0] - 1, s.trajectory_steps))
                            .astype(int))
        strip = parallel.fetch(path)[columns].swapaxes(0, 1)  # [samples, columns, H, W, C]
        picture = images.grid(images.to_uint8(strip.reshape(-1, *shape)), nrow=len(columns))
        return {"trajectory": images.save_png(picture,
                                              directory / f"trajectory_{step:08d}.png")}

    return extras

