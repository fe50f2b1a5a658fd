"""The variational autoencoder family (Kingma & Welling 2014): a diagonal Gaussian posterior
q(z|x) from a convolutional encoder, reparameterised samples z, and a decoder p(x|z).

Training minimises the negative β-ELBO in nats per example,
    loss = -E_q[log p(x|z)] + β KL(q(z|x) || N(0, I)),
with one reparameterised sample and the KL in closed form. Evaluation reports the ELBO and the
importance-weighted bound (Burda et al. 2016) log p(x) >= E[logsumexp_k log w_k - log k],
w_k = p(x|z_k) p(z_k) / q(z_k|x), with k = eval.iw_samples.

Likelihoods (`model.likelihood`), each normalised over what it models:
  - "bernoulli": binarised pixels; training binarises dynamically (pixel/255 is the probability
    of a 1, a fresh draw every step); evaluation by default does too (`eval.binarize=
    "stochastic"`, the protocol of published dynamically-binarised MNIST numbers), every
    held-out example drawing from its own key, or thresholds at 1/2 ("threshold": a different,
    easier data set, lower nats, not comparable with those numbers);
  - "logistic": discretised logistic on the 256 pixel values (PixelCNN++, Salimans et al. 2017;
    Kingma et al. 2016): the mass of each bin, the two edge bins taking the tails;
  - "gaussian": the same discretisation of a Gaussian.
  Scales are per pixel (decoder outputs) or one learned per channel (`model.scale`).
  2-D points (data kind "points") use a continuous Gaussian density ("gaussian").

Metrics, in nats per example: `loss` (the β-weighted objective), `elbo` (the bound on
log p(x), negative), `kl`, `reconstruction` (-E_q log p(x|z)); evaluation adds `nll_nats`
(minus the importance-weighted bound: an upper bound on the NLL, below -elbo) and
`bits_per_dim` (nll_nats / (dims * ln 2)). Training metrics see dynamically binarised pixels,
evaluation `eval.binarize` ones. Evaluation's random draws (binarisation, the ELBO's z, the k
importance samples) come from keys of (seed, the example's `index` in the held-out split), so
each example gets fresh draws, the same at every evaluation and with any batch size.
"""

from __future__ import annotations

import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.scipy.special import log_ndtr

from genai_jax import config_checks as config_lib
from genai_jax import parallel
from genai_jax.config_checks import ConfigError
from genai_jax.data import toys
from genai_jax.models import images
from genai_jax.models.family import Family
from genai_jax.models.vae_nets import NetConfig, VAENets
from genai_jax.optim import (
    TrainState,
    federated_from_config,
    learning_rate_schedule,
    make_optimizer,
    make_train_step,
    privacy_from_config,
)

LIKELIHOODS = ("bernoulli", "logistic", "gaussian")
MIN_LOG_SCALE = -7.0  # PixelCNN++'s floor: far below a bin's half-width (log(1/255) = -5.5)
HALF_BIN = 1.0 / 255.0  # half the width of a pixel bin in [-1, 1]


def config_defaults() -> dict:
    # model.channels: width of the first conv stage, doubled at each of model.stages stages;
    # model.blocks: residual blocks per stage; model.hidden: the dense layer between the conv
    # features and the latents (and the MLPs' width for points, model.mlp_layers deep);
    # model.scale: "per_pixel" (decoder outputs) or "learned" (one per channel), for the
    # logistic and Gaussian likelihoods; model.beta weighs the KL term.
    return {
        "model": dict(conditional=False, dtype="float32", likelihood="bernoulli", latent_dim=32,
                      channels=32, stages=2, blocks=1, hidden=256, mlp_layers=2, label_dim=16,
                      scale="per_pixel", beta=1.0),
        # mean: images show the decoder's mean (Bernoulli probabilities, logistic/Gaussian
        # locations) rather than a draw of every pixel; points always draw from p(x|z).
        "sample": dict(num_samples=100, mean=True, traversal_dims=8, traversal_steps=9,
                       traversal_range=2.5, interpolation_pairs=8, interpolation_steps=10),
        # binarize (Bernoulli only): held-out pixels drawn with probability pixel/255, from a
        # key of each example's own ("stochastic", as the IWAE paper evaluates), or thresholded
        # at 1/2 ("threshold"). iw_samples: k of the importance-weighted bound (published MNIST
        # figures use k = 5000; `experiments.evaluate --set=eval.iw_samples=1000` for a figure
        # to compare, the default keeps periodic evaluations cheap).
        "eval": dict(num_samples=1000, iw_samples=100, iw_chunk=10, binarize="stochastic"),
    }


def validate(config) -> None:
    m = config.model
    config_lib.check_choices(config, {"model.likelihood": LIKELIHOODS,
                                      "model.scale": ("per_pixel", "learned"),
                                      "eval.binarize": ("threshold", "stochastic"),
                                      "model.dtype": ("float32", "bfloat16")})
    config_lib.check_positive(config, (
        "model.latent_dim", "model.channels", "model.stages", "model.hidden", "model.label_dim",
        "model.mlp_layers", "eval.iw_samples", "eval.iw_chunk", "sample.traversal_dims",
        "sample.traversal_steps", "sample.interpolation_pairs", "sample.interpolation_steps"))
    if m.blocks < 0 or m.beta < 0:
        raise ConfigError("model.blocks and model.beta must be >= 0")
    if config.eval.iw_samples % config.eval.iw_chunk:
        raise ConfigError(f"eval.iw_chunk={config.eval.iw_chunk} must divide "
                          f"eval.iw_samples={config.eval.iw_samples}")
    if config.data.name in toys.TOYS and m.likelihood != "gaussian":
        raise ConfigError(f"data.name={config.data.name!r} is 2-D points, modelled by a "
                          "continuous Gaussian: set --config.model.likelihood=gaussian")


# ----------------------------------------------------------------------------- likelihoods


def _log_diff_logistic(a: jax.Array, b: jax.Array) -> jax.Array:
    """log(sigmoid(a) - sigmoid(b)) for a > b, stable in both tails:
    sigmoid(a) - sigmoid(b) = e^a (1 - e^-(a-b)) / ((1 + e^a)(1 + e^b))."""
    return (a + jnp.log(-jnp.expm1(b - a)) - jax.nn.softplus(a) - jax.nn.softplus(b))


def _log_diff_normal(a: jax.Array, b: jax.Array) -> jax.Array:
    """log(Phi(a) - Phi(b)) for a > b, stable in both tails: mirrored (Phi(-b) - Phi(-a)) when
    b > 0, so the larger of the two log-CDFs is never close to 0 in float32."""
    flip = b > 0
    hi, lo = jnp.where(flip, -b, a), jnp.where(flip, -a, b)
    log_hi, log_lo = log_ndtr(hi), log_ndtr(lo)
    return log_hi + jnp.log(-jnp.expm1(log_lo - log_hi))


def discretized_log_prob(x: jax.Array, mean: jax.Array, log_scale: jax.Array,
                         kind: str) -> jax.Array:
    """Elementwise log-probability of pixels `x` in [-1, 1] (the 256 bin centres
    `k / 127.5 - 1`) under a logistic or Gaussian discretised to those bins; the first and
    last bins take the tails, so the 256 probabilities sum to 1."""
    log_scale = jnp.maximum(log_scale, MIN_LOG_SCALE)
    inv = jnp.exp(-log_scale)
    upper, lower = (x - mean + HALF_BIN) * inv, (x - mean - HALF_BIN) * inv
    if kind == "logistic":
        middle = _log_diff_logistic(upper, lower)
        first, last = jax.nn.log_sigmoid(upper), jax.nn.log_sigmoid(-lower)
    else:
        middle = _log_diff_normal(upper, lower)
        first, last = log_ndtr(upper), log_ndtr(-lower)
    return jnp.where(x < -1 + HALF_BIN, first, jnp.where(x > 1 - HALF_BIN, last, middle))


def gaussian_log_density(x: jax.Array, mean: jax.Array, log_scale: jax.Array) -> jax.Array:
    log_scale = jnp.maximum(log_scale, MIN_LOG_SCALE)
    return -0.5 * (jnp.square((x - mean) * jnp.exp(-log_scale)) + math.log(2 * math.pi)) - log_scale


def bernoulli_log_prob(x: jax.Array, logits: jax.Array) -> jax.Array:
    """log p(x) of x in {0, 1} under Bernoulli(sigmoid(logits)), elementwise."""
    return x * logits - jax.nn.softplus(logits)


def standard_normal_log_density(z: jax.Array) -> jax.Array:
    return -0.5 * jnp.sum(jnp.square(z) + math.log(2 * math.pi), axis=-1)


def diagonal_normal_log_density(z: jax.Array, mean: jax.Array, log_std: jax.Array) -> jax.Array:
    return -0.5 * jnp.sum(jnp.square((z - mean) * jnp.exp(-log_std)) + math.log(2 * math.pi)
                          + 2 * log_std, axis=-1)


def gaussian_kl(mean: jax.Array, log_std: jax.Array) -> jax.Array:
    """KL(N(mean, exp(log_std)^2) || N(0, I)) in nats, `[batch, latent] -> [batch]`."""
    return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(2 * log_std) - 1.0 - 2 * log_std, axis=-1)


# ----------------------------------------------------------------------------- the model


class VAE:
    """The pure functions of a VAE on one data set: the likelihood and the bounds.

    `params` is the `nnx.State` of `VAENets`; `x` is the batch in model form (`inputs`):
    {0, 1} pixels for "bernoulli", [-1, 1] pixels otherwise, raw coordinates for points.
    """

    def __init__(self, config, data_info: dict):
        self.kind, self.shape = data_info["kind"], tuple(data_info["shape"])
        self.likelihood = "gaussian" if self.kind == "points" else config.model.likelihood
        self.continuous = self.kind == "points"
        self.learned_scale = self.likelihood != "bernoulli" and config.model.scale == "learned"
        channels = self.shape[-1]
        per_pixel_params = channels if self.likelihood == "bernoulli" or self.learned_scale else (
            2 * channels)
        m = config.model
        self.net_cfg = NetConfig(
            shape=self.shape, latent_dim=m.latent_dim, out_channels=per_pixel_params,
            channels=tuple(m.channels * 2 ** i for i in range(m.stages)), blocks=m.blocks,
            hidden=m.hidden, mlp_layers=m.mlp_layers,
            num_classes=data_info["num_classes"] if m.conditional else 0,
            label_dim=m.label_dim, learned_scale=self.learned_scale, dtype=m.dtype)
        self.num_dims = math.prod(self.shape)
        self.graphdef, _ = nnx.split(nnx.eval_shape(lambda: VAENets(self.net_cfg,
                                                                    rngs=nnx.Rngs(0))))

    def init_params(self, rng: jax.Array):
        return nnx.state(VAENets(self.net_cfg, rngs=nnx.Rngs(params=rng)), nnx.Param)

    def inputs(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """A data batch (uint8 pixels or float points) as the model's targets; Bernoulli pixels
        are binarised dynamically when `rng` is given, else at a fixed threshold."""
        if self.likelihood == "bernoulli":
            return images.binarize(x, rng)
        return images.to_model(x)

    def model_range(self, x: jax.Array) -> jax.Array:
        """Targets as pictures in [-1, 1] (binary pixels to -1/+1); the encoder's input."""
        return 2.0 * x - 1.0 if self.likelihood == "bernoulli" else x

    def encode(self, params, x: jax.Array, labels: jax.Array | None):
        """`(mean, log_std)` of q(z|x), each `[batch, latent]`."""
        return nnx.merge(self.graphdef, params).encode(self.model_range(x), labels)

    def decode(self, params, z: jax.Array, labels: jax.Array | None):
        """`(location, log_scale)` of p(x|z), each `[batch, *shape]` (location: logits for
        Bernoulli, log_scale None)."""
        nets = nnx.merge(self.graphdef, params)
        out = nets.decode(z, labels)
        if self.likelihood == "bernoulli":
            return out, None
        if self.learned_scale:
            return out, jnp.broadcast_to(nets.log_scale[...], out.shape)
        loc, log_scale = jnp.split(out, 2, axis=-1)
        return loc, log_scale

    def log_likelihood(self, x: jax.Array, loc: jax.Array, log_scale) -> jax.Array:
        """log p(x|z) summed over the dimensions of each example: `[batch]`."""
        if self.likelihood == "bernoulli":
            lp = bernoulli_log_prob(x, loc)
        elif self.continuous:
            lp = gaussian_log_density(x, loc, log_scale)
        else:
            lp = discretized_log_prob(x, loc, log_scale, self.likelihood)
        return lp.reshape(lp.shape[0], -1).sum(-1)

    def mean(self, loc: jax.Array) -> jax.Array:
        """The decoder's mean picture in model range ([-1, 1] for images)."""
        if self.likelihood == "bernoulli":
            return 2.0 * jax.nn.sigmoid(loc) - 1.0
        return loc if self.continuous else jnp.clip(loc, -1.0, 1.0)

    def draw(self, rng: jax.Array, loc: jax.Array, log_scale) -> jax.Array:
        """A sample of p(x|z) in model range; images land on the 256 pixel values."""
        if self.likelihood == "bernoulli":
            return 2.0 * jax.random.bernoulli(rng, jax.nn.sigmoid(loc)).astype(jnp.float32) - 1
        scale = jnp.exp(jnp.maximum(log_scale, MIN_LOG_SCALE))
        noise = (jax.random.logistic(rng, loc.shape) if self.likelihood == "logistic"
                 else jax.random.normal(rng, loc.shape))
        x = loc + scale * noise
        return x if self.continuous else jnp.round((jnp.clip(x, -1, 1) + 1) * 127.5) / 127.5 - 1

    def elbo_terms(self, params, x: jax.Array, labels, eps: jax.Array):
        """One reparameterised sample z = mean + std * eps (`eps [batch, latent]` standard
        normal): `(log p(x|z) [batch], KL [batch])` in nats."""
        mean, log_std = self.encode(params, x, labels)
        z = mean + jnp.exp(log_std) * eps
        loc, log_scale = self.decode(params, z, labels)
        return self.log_likelihood(x, loc, log_scale), gaussian_kl(mean, log_std)

    def log_weights(self, params, x: jax.Array, labels, eps: jax.Array,
                    chunk: int | None = None) -> jax.Array:
        """Importance log-weights log p(x|z_k) + log p(z_k) - log q(z_k|x), `[k, batch]`, for
        z_k = mean + std * eps[k] (`eps [k, batch, latent]`); the decoder sees `chunk` samples
        of the batch at a time (a `lax.map`), so memory holds `chunk * batch` decodings."""
        k, batch = eps.shape[:2]
        chunk = chunk or k
        mean, log_std = self.encode(params, x, labels)
        tile = lambda a: None if a is None else jnp.tile(a, (chunk,) + (1,) * (a.ndim - 1))
        xs, ys = tile(x), tile(labels)

        def one_chunk(e):  # [chunk, batch, latent] -> [chunk, batch]
            z = mean + jnp.exp(log_std) * e
            loc, log_scale = self.decode(params, z.reshape(chunk * batch, -1), ys)
            log_px = self.log_likelihood(xs, loc, log_scale).reshape(chunk, batch)
            return (log_px + standard_normal_log_density(z)
                    - diagonal_normal_log_density(z, mean, log_std))

        # The noise is small and drawn per example (split over the batch); replicated here,
        # the decoder's [chunk * batch] rows keep the split sharding propagation chooses for
        # them (a batch split here had it replicate tensors inside the map instead).
        chunks = parallel.constrain(eps.reshape(k // chunk, chunk, batch, -1), (None,) * 4)
        out = jax.lax.map(one_chunk, chunks)
        return out.reshape(k, batch)

    def iw_bound(self, params, x: jax.Array, labels, eps: jax.Array,
                 chunk: int | None = None) -> jax.Array:
        """The importance-weighted lower bound on log p(x) with k samples
        (`eps [k, batch, latent]`, as `log_weights`), `[batch]` nats."""
        w = self.log_weights(params, x, labels, eps, chunk)
        return jax.nn.logsumexp(w, axis=0) - math.log(eps.shape[0])


def heldout_noise(seed: int, index: jax.Array, latent_dim: int, k: int):
    """Evaluation's random draws, each held-out example's from a key of (seed, its `index` in
    the held-out split): `(binarisation keys [batch], eps [batch, latent] for the ELBO, eps
    [k, batch, latent] for the importance-weighted bound)`. Keys per example, not per batch:
    every example gets fresh draws, repeatable, whatever the batch size or sharding."""
    base = jax.random.PRNGKey(seed)
    keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(base, i), 3))(index)
    elbo_eps = jax.vmap(lambda key: jax.random.normal(key, (latent_dim,)))(keys[:, 1])
    iw_eps = jax.vmap(lambda key: jax.random.normal(key, (k, latent_dim)))(keys[:, 2])
    return keys[:, 0], elbo_eps, jnp.swapaxes(iw_eps, 0, 1)


def build(config, data_info: dict) -> Family:
    """The VAE family for `config` on data described by `data_info` (`models.images`)."""
    images.check_conditional(config, data_info)
    vae = VAE(config, data_info)
    conditional, beta = config.model.conditional, config.model.beta
    tx = make_optimizer(config.train)
    labels_of = lambda batch: batch["label"] if conditional else None

    def init(rng: jax.Array) -> TrainState:
        params_rng, state_rng = jax.random.split(rng)
        return TrainState.create(vae.init_params(params_rng), tx, state_rng,
                                 config.train.ema_decay)

    def loss_fn(params, batch, rng):
        binarize_rng, z_rng = jax.random.split(rng)
        x = vae.inputs(batch["x"], binarize_rng)
        eps = jax.random.normal(z_rng, (x.shape[0], config.model.latent_dim))
        log_px, kl = vae.elbo_terms(params, x, labels_of(batch), eps)
        loss = jnp.mean(-log_px + beta * kl)
        return loss, {"elbo": jnp.mean(log_px - kl), "kl": jnp.mean(kl),
                      "reconstruction": -jnp.mean(log_px)}

    def eval_step(state: TrainState, batch) -> dict:
        """Bounds on a held-out batch, which carries each example's `index`
        (`genai_jax.data.images.eval_batches`): its draws come from it (`heldout_noise`)."""
        params, labels = state.eval_params, labels_of(batch)
        binarize_keys, elbo_eps, iw_eps = heldout_noise(
            config.seed + 1, batch["index"], config.model.latent_dim, config.eval.iw_samples)
        if config.eval.binarize == "stochastic":
            x = jax.vmap(vae.inputs)(batch["x"], binarize_keys)
        else:
            x = vae.inputs(batch["x"])
        log_px, kl = vae.elbo_terms(params, x, labels, elbo_eps)
        nll = -vae.iw_bound(params, x, labels, iw_eps, config.eval.iw_chunk)
        return {"loss": jnp.mean(-log_px + beta * kl), "elbo": jnp.mean(log_px - kl),
                "nll_nats": jnp.mean(nll),
                "bits_per_dim": jnp.mean(nll) / (vae.num_dims * math.log(2)),
                "kl": jnp.mean(kl), "reconstruction": -jnp.mean(log_px)}

    sample_fn = functools.partial(generate, vae, conditional=conditional,
                                  mean=config.sample.mean)
    return images.make_family(
        config, data_info, init=init,
        train_step=make_train_step(loss_fn, tx, accum_steps=config.train.grad_accum_steps,
                                   ema_decay=config.train.ema_decay,
                                   schedule=learning_rate_schedule(config.train),
                                   privacy=privacy_from_config(config, data_info),
                                   federated=federated_from_config(config, data_info)),
        eval_step=eval_step, generate=sample_fn,
        extras=_extras(config, data_info, vae, sample_fn))


def generate(vae: VAE, params, rng: jax.Array, labels: jax.Array, *, conditional: bool,
             mean: bool) -> jax.Array:
    """`len(labels)` samples in model range: z ~ N(0, I) decoded with `params` (eval params),
    shown as the decoder's mean (`mean`, images only) or drawn from p(x|z)."""
    z_rng, x_rng = jax.random.split(rng)
    z = jax.random.normal(z_rng, (labels.shape[0], vae.net_cfg.latent_dim))
    loc, log_scale = vae.decode(params, z, labels if conditional else None)
    if mean and vae.kind == "image":
        return vae.mean(loc)
    return vae.draw(x_rng, loc, log_scale)


# ----------------------------------------------------------------------------- pictures


def _extras(config, data_info: dict, vae: VAE, generate):
    """`extras(params, rng, directory, step) -> {name: path}`: reconstructions, latent
    traversals and interpolations of held-out images as PNG grids (images only).

    Held-out images are the first of `data_info["data"].validation`; without data (None or
    missing) they are the model's own samples from the prior, thresholded like held-out data.
    """
    if vae.kind != "image":
        return None
    s, conditional = config.sample, config.model.conditional
    encode = jax.jit(vae.encode)
    decode_mean = jax.jit(lambda params, z, y: vae.mean(vae.decode(params, z, y)[0]))
    n_recon, n_stats = 20, 500  # images in the reconstruction grid; for ranking latent dims

    def held_out(params, rng, n: int) -> tuple[np.ndarray, np.ndarray]:
        source = getattr(data_info.get("data"), "validation", None)
        if hasattr(source, "x"):  # in memory (`image_sources.ArraySource`)
            return np.asarray(source.x[:n]), np.asarray(source.label[:n], np.int32)
        if source is not None:  # read by index (`image_sources.TfdsSource`)
            rows = source.get(np.arange(min(n, len(source))))
            return np.asarray(rows["x"]), np.asarray(rows["label"], np.int32)
        labels = images.default_labels(n, data_info["num_classes"])
        return images.to_uint8(parallel.fetch(generate(params, rng, jnp.asarray(labels)))), labels

    def extras(params, rng: jax.Array, directory: pathlib.Path, step: int) -> dict[str, str]:
        directory = pathlib.Path(directory)
        x_uint8, labels = held_out(params, rng, max(n_stats, n_recon, 2 * s.interpolation_pairs))
        x = vae.inputs(jnp.asarray(x_uint8))
        y = jnp.asarray(labels) if conditional else None
        mean, log_std = encode(params, x, y)
        take = lambda a, idx: None if a is None else a[idx]
        paths = {}

        # Originals (as the model sees them) over their reconstructions (decoded posterior
        # means), two pairs of rows of ten.
        n = min(n_recon, len(x))
        recon = decode_mean(params, mean[:n], take(y, slice(0, n)))
        shown = vae.model_range(x[:n])
        rows = [a[i:i + 10] for i in range(0, n, 10) for a in (shown, recon)]
        paths["reconstructions"] = _save(jnp.concatenate(rows), 10,
                                         directory / f"reconstructions_{step:08d}.png")

        # Traversals of the first held-out image: one row per latent dimension (the most used
        # ones, by mean KL over the held-out images), `traversal_steps` values in
        # +-traversal_range prior standard deviations around its posterior mean.
        kl_per_dim = 0.5 * (jnp.square(mean) + jnp.exp(2 * log_std) - 1 - 2 * log_std).mean(0)
        dims = np.argsort(-parallel.fetch(kl_per_dim))[:s.traversal_dims]
        values = np.linspace(-s.traversal_range, s.traversal_range, s.traversal_steps)
        z = np.repeat(parallel.fetch(mean[:1]), len(dims) * len(values), axis=0)
        z = z.reshape(len(dims), len(values), -1)
        z[np.arange(len(dims)), :, dims] += values
        ty = None if y is None else jnp.full((z.shape[0] * z.shape[1],), y[0])
        paths["traversals"] = _save(decode_mean(params, jnp.asarray(z.reshape(-1, z.shape[-1])),
                                                ty), len(values),
                                    directory / f"traversals_{step:08d}.png")

        # Interpolations between the posterior means of pairs of held-out images (each row
        # keeps its first image's label when conditional).
        p = min(s.interpolation_pairs, len(x) // 2)
        t = jnp.linspace(0.0, 1.0, s.interpolation_steps)[None, :, None]
        z = (1 - t) * mean[:p, None] + t * mean[p:2 * p, None]
        iy = None if y is None else jnp.repeat(y[:p], s.interpolation_steps)
        paths["interpolations"] = _save(decode_mean(params, z.reshape(-1, z.shape[-1]), iy),
                                        s.interpolation_steps,
                                        directory / f"interpolations_{step:08d}.png")
        return paths

    return extras


def _save(x: jax.Array, nrow: int, path: pathlib.Path) -> str:
    return images.save_png(images.grid(images.to_uint8(parallel.fetch(x)), nrow), path)


__all__ = ["VAE", "build", "config_defaults", "discretized_log_prob", "heldout_noise",
           "validate"]
