"""The VAE family: real training steps, the bounds (ELBO, importance-weighted), the discretised
likelihoods against scipy, evaluation binarisation, config checks, and the pictures."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from PIL import Image

from genai_jax.config import ConfigError, base_config
from genai_jax.models import vae as vae_lib
from tests.conftest import overridden

DIGITS_INFO = {"kind": "image", "shape": (8, 8, 1), "num_classes": 10, "data": None}


@pytest.fixture(scope="module", autouse=True)
def fast_init_compiles():
    """XLA:CPU compiles the partitionable threefry of every parameter initialiser 3-5x slower
    (jax 0.10.2: ~9 s instead of ~3 s for a VAE's `init`); these tests do not shard, and no
    assertion depends on the parameters' random values."""
    previous = jax.config.jax_threefry_partitionable
    jax.config.update("jax_threefry_partitionable", False)
    yield
    jax.config.update("jax_threefry_partitionable", previous)


def vae_config(**overrides):
    """A small VAE for 8x8 images: compiles in a few seconds."""
    c = base_config("vae")
    c.model.update(latent_dim=8, channels=16, stages=2, blocks=1, hidden=64)
    c.train.update(batch_size=32, learning_rate=3e-3, warmup_steps=0, weight_decay=0.0,
                   grad_clip=0.0, steps=100)
    c.eval.update(iw_samples=100, iw_chunk=25)
    return overridden(c, overrides)


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 8x8 digits as uint8 `[n, 8, 8, 1]` images and int32 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return x, d.target.astype(np.int32)


def batch_of(digits, start: int, size: int, index_start: int = 0) -> dict:
    """Digits `start:start + size`; `index` as an evaluation batch carries it (the examples'
    positions in a held-out split that starts at `index_start`)."""
    x, y = digits
    return {"x": jnp.asarray(x[start:start + size]), "label": jnp.asarray(y[start:start + size]),
            "index": jnp.arange(index_start, index_start + size, dtype=jnp.int32)}


@pytest.fixture(scope="module")
def trained(digits):
    """100 steps (one compiled `lax.scan`) on the first 1,536 digits; the last 256 held out."""
    config = vae_config()
    family = vae_lib.build(config, DIGITS_INFO)
    state = jax.jit(family.init)(jax.random.PRNGKey(0))
    x, y = digits
    order = np.random.default_rng(0).integers(0, 1536, (100, 32))
    batches = {"x": jnp.asarray(x[order]), "label": jnp.asarray(y[order])}
    eval_step = jax.jit(family.eval_step)
    held_out = batch_of(digits, 1536, 256)
    before = eval_step(state, held_out)
    after_state, metrics = jax.jit(lambda s, b: jax.lax.scan(family.train_step, s, b))(state,
                                                                                       batches)
    return types.SimpleNamespace(config=config, family=family, initial_state=state,
                                 state=after_state, metrics=metrics, before=before,
                                 after=eval_step(after_state, held_out), held_out=held_out,
                                 vae=vae_lib.VAE(config, DIGITS_INFO))


def check_real_steps(family, state, digits):
    """Two real training steps: finite metrics that add up, and every parameter moves (a
    residual block's first conv gets a gradient once its zero-initialised second conv has)."""
    step = jax.jit(family.train_step)
    new_state, metrics = step(state, batch_of(digits, 0, 32))
    assert {"loss", "elbo", "kl", "reconstruction", "grad_norm"} <= set(metrics)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["kl"]) >= 0 and int(new_state.step) == 1
    np.testing.assert_allclose(metrics["elbo"], -(metrics["reconstruction"] + metrics["kl"]),
                               rtol=1e-5)
    new_state, _ = step(new_state, batch_of(digits, 32, 32))
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, new_state.params)
    assert all(jax.tree.leaves(changed)), changed


def test_one_real_training_step(trained, digits):
    check_real_steps(trained.family, trained.initial_state, digits)


@pytest.mark.parametrize("overrides", [
    {"model.likelihood": "logistic", "model.conditional": True},
    {"model.likelihood": "gaussian", "model.scale": "learned"},
], ids=["logistic-conditional", "gaussian-learned-scale"])
def test_other_likelihoods_train(overrides, digits):
    family = vae_lib.build(vae_config(**{"model.channels": 8, **overrides}), DIGITS_INFO)
    check_real_steps(family, jax.jit(family.init)(jax.random.PRNGKey(0)), digits)


def test_short_run_learns(trained):
    losses = np.asarray(trained.metrics["loss"])
    assert np.all(np.isfinite(losses))
    assert losses[-10:].mean() < 0.7 * losses[0], losses[::10]
    # held-out: the bound on log p(x) rises by far more than the noise of its estimate
    assert float(trained.after["nll_nats"]) < float(trained.before["nll_nats"]) - 10


def test_eval_metrics_and_their_relations(trained):
    m = {k: float(v) for k, v in trained.after.items()}
    assert {"elbo", "nll_nats", "bits_per_dim", "kl", "reconstruction"} <= set(m)
    assert m["elbo"] < 0 < m["nll_nats"]
    assert m["nll_nats"] <= -m["elbo"]  # the importance-weighted bound is the tighter one
    np.testing.assert_allclose(m["bits_per_dim"], m["nll_nats"] / (64 * np.log(2)), rtol=1e-5)
    np.testing.assert_allclose(m["elbo"], -(m["reconstruction"] + m["kl"]), rtol=1e-5)
    # 64 binary pixels: a trained model beats a fair coin on each (64 ln 2 nats)
    assert m["nll_nats"] < 64 * np.log(2)


def test_stochastic_evaluation_binarisation(trained):
    """eval.binarize="stochastic" (the default) draws every held-out example's pixels from a key
    of its own index: repeatable, the same however the held-out split is batched (the mean over
    two half batches is the mean over the whole), fresh for every example (one key reused for
    every batch would give equal images equal draws), and harder to model than thresholded
    pixels (grey pixels become coin flips)."""
    assert trained.config.eval.binarize == "stochastic"
    eval_step = jax.jit(trained.family.eval_step)
    held_out, state = trained.held_out, trained.state
    again = eval_step(state, held_out)
    assert all(float(again[k]) == float(trained.after[k]) for k in again)
    half = lambda sl: {k: v[sl] for k, v in held_out.items()}
    halves = [eval_step(state, half(slice(0, 128))), eval_step(state, half(slice(128, None)))]
    for key in ("nll_nats", "elbo", "kl", "reconstruction"):
        np.testing.assert_allclose((float(halves[0][key]) + float(halves[1][key])) / 2,
                                   float(trained.after[key]), rtol=1e-5, err_msg=key)

    # the same 128 images as examples 0-127 and as examples 128-255 of the held-out split
    same_images = {**half(slice(0, 128)), "index": held_out["index"][128:]}
    keys = vae_lib.heldout_noise(trained.config.seed + 1, held_out["index"], 8, 4)[0]
    draws = jax.vmap(trained.vae.inputs)(jnp.concatenate([held_out["x"][:128]] * 2), keys)
    grey = (held_out["x"][:128] > 20) & (held_out["x"][:128] < 235)
    assert float(jnp.mean(draws[:128] != draws[128:], where=grey)) > 0.2  # fresh draws
    assert float(eval_step(state, same_images)["nll_nats"]) != float(halves[0]["nll_nats"])

    threshold = vae_config(**{"eval.binarize": "threshold"})
    thresholded = jax.jit(vae_lib.build(threshold, DIGITS_INFO).eval_step)(state, held_out)
    assert float(trained.after["nll_nats"]) > float(thresholded["nll_nats"]) + 1


def test_importance_weighted_bound(trained):
    vae, params, held_out = trained.vae, trained.state.params, trained.held_out
    x = vae.inputs(held_out["x"][:64])
    log_weights = jax.jit(vae.log_weights, static_argnums=4)

    # k = 1: a log-weight is exactly the one-sample ELBO estimate log p(x|z) + log p(z)
    # - log q(z|x) at the same z ...
    def by_hand(eps):
        mean, log_std = vae.encode(params, x, None)
        z = mean + jnp.exp(log_std) * eps
        loc, _ = vae.decode(params, z, None)
        return (vae.log_likelihood(x, loc, None) + jax.scipy.stats.norm.logpdf(z).sum(-1)
                - jax.scipy.stats.norm.logpdf(z, mean, jnp.exp(log_std)).sum(-1))

    eps = jax.random.normal(jax.random.PRNGKey(1), (100, 64, 8))
    w = log_weights(params, x, None, eps, None)  # [100, 64]
    np.testing.assert_allclose(w[0], jax.jit(by_hand)(eps[0]), rtol=1e-5, atol=1e-3)
    # ... whose mean over many draws is the ELBO with the KL in closed form (each image's 100
    # log-weights are 100 independent k = 1 bounds; against 100 ELBO estimates).
    log_px, kl = jax.jit(vae.elbo_terms)(params, jnp.tile(x, (100, 1, 1, 1)), None,
                                         jax.random.normal(jax.random.PRNGKey(3), (6400, 8)))
    elbo = np.asarray(log_px - kl).reshape(100, 64)
    diff = np.asarray(w).mean(0) - elbo.mean(0)
    stderr = np.sqrt(np.asarray(w).var(0) / 100 + elbo.var(0) / 100)
    assert np.all(np.abs(diff) < 5 * stderr + 1e-3), (diff, stderr)
    # The bound with k samples: more samples never loosen it (on average over the batch), it
    # is what `iw_bound` computes, and chunking the samples is only a memory layout.
    bounds = [float((jax.nn.logsumexp(w[:k], 0) - np.log(k)).mean()) for k in (1, 10, 100)]
    assert bounds[0] < bounds[1] < bounds[2], bounds
    np.testing.assert_allclose(log_weights(params, x, None, eps, 10), w, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        jax.jit(vae.iw_bound, static_argnums=4)(params, x, None, eps, 10),
        jax.nn.logsumexp(w, 0) - np.log(100), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["logistic", "gaussian"])
def test_discretised_likelihood_is_normalised_and_matches_scipy(kind):
    bins = jnp.arange(256) / 127.5 - 1.0
    means = [-1.5, -1.0, -0.3, 0.0, 0.5, 1.0, 3.0]
    log_scales = [-7.0, -5.0, -3.0, -1.0, 0.0, 2.0]
    for mean in means:
        for log_scale in log_scales:
            lp = vae_lib.discretized_log_prob(bins, jnp.full(256, mean), jnp.full(256, log_scale),
                                              kind)
            assert np.all(np.isfinite(lp)), (mean, log_scale)
            np.testing.assert_allclose(float(jnp.exp(lp).sum()), 1.0, atol=1e-4,
                                       err_msg=f"{kind} mean={mean} log_scale={log_scale}")
    # Each bin's mass against the distribution's CDF in float64.
    dist = scipy.stats.logistic if kind == "logistic" else scipy.stats.norm
    b = np.asarray(bins, np.float64)
    for mean, log_scale in [(0.1, -3.0), (-0.8, -2.0), (0.9, -4.5)]:
        cdf = lambda v, mean=mean, log_scale=log_scale: dist.cdf(v, mean, np.exp(log_scale))
        expected = cdf(b + 1 / 255) - cdf(b - 1 / 255)
        expected[0], expected[-1] = cdf(b[0] + 1 / 255), 1 - cdf(b[-1] - 1 / 255)
        got = np.exp(np.asarray(vae_lib.discretized_log_prob(
            bins, jnp.full(256, mean), jnp.full(256, log_scale), kind), np.float64))
        big = expected > 1e-6
        np.testing.assert_allclose(got[big], expected[big], rtol=2e-3)
    # Gradients stay finite in the far tails and at the smallest scale.
    grads = jax.grad(lambda m, s: vae_lib.discretized_log_prob(bins, m, s, kind).sum(),
                     argnums=(0, 1))(jnp.full(256, 3.0), jnp.full(256, -7.0))
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_conditional_without_labels_is_one_line_config_error():
    config = vae_config(**{"model.conditional": True})
    with pytest.raises(ConfigError, match="model.conditional") as error:
        vae_lib.build(config, {**DIGITS_INFO, "num_classes": 0})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("overrides,key", [
    ({"eval.iw_chunk": 30}, "eval.iw_chunk"),
    ({"model.likelihood": "poisson"}, "model.likelihood"),
    ({"data.name": "ring8"}, "model.likelihood=gaussian"),
    ({"model.stages": 0}, "model.stages"),
])
def test_impossible_values_are_rejected(overrides, key):
    with pytest.raises(ConfigError, match=key) as error:
        vae_lib.validate(vae_config(**overrides))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("with_data", [True, False], ids=["held-out", "no-data"])
def test_extras_write_pngs(trained, digits, tmp_path, with_data):
    x, y = digits
    validation = types.SimpleNamespace(x=x[1536:], label=y[1536:])
    info = {**DIGITS_INFO, "data": types.SimpleNamespace(validation=validation)
            if with_data else None}
    family = vae_lib.build(trained.config, info)
    outputs = family.sample(trained.state, jax.random.PRNGKey(0), num_samples=20)
    assert outputs["x"].shape == (20, 8, 8, 1)
    assert outputs["x"].min() >= -1 and outputs["x"].max() <= 1
    summary = family.save_samples(outputs, str(tmp_path), 7)
    s = trained.config.sample
    # 8x8 images are drawn 4x larger in the grids, with 1-pixel gaps.
    side = lambda n: n * 33 + 1
    expected = {"samples": (side(10), side(2)), "reconstructions": (side(10), side(4)),
                "traversals": (side(s.traversal_steps), side(s.traversal_dims)),
                "interpolations": (side(s.interpolation_steps), side(s.interpolation_pairs))}
    for name, size in expected.items():
        path = tmp_path / f"{name if name != 'samples' else 'step'}_00000007.png"
        assert f"{name}: {path}" in summary
        with Image.open(path) as picture:
            assert picture.size == size, name
            assert np.asarray(picture).std() > 10, f"{name} is blank"


def test_points_use_mlp_and_gaussian_density():
    config = vae_config(**{"data.name": "ring8", "model.likelihood": "gaussian",
                           "model.latent_dim": 2})
    vae_lib.validate(config)
    info = {"kind": "points", "shape": (2,), "num_classes": 8, "data": None}
    family = vae_lib.build(config, info)
    state = jax.jit(family.init)(jax.random.PRNGKey(0))
    points = jax.random.normal(jax.random.PRNGKey(1), (32, 2))
    new_state, metrics = jax.jit(family.train_step)(state, {"x": points,
                                                            "label": jnp.zeros(32, jnp.int32)})
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert "encoder" in str(jax.tree.structure(new_state.params))
    samples = family.sample(new_state, jax.random.PRNGKey(2), num_samples=16)["x"]
    assert samples.shape == (16, 2) and np.all(np.isfinite(samples))
    assert samples.std() > 0  # points are drawn from p(x|z), not collapsed to its mean
