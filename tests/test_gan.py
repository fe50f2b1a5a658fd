"""The GAN family: its train step, losses and regularisers, spectral norm, R1, the projection
discriminator, mode coverage on the 8-Gaussians ring, and its config checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genai_jax.config import ConfigError, base_config
from genai_jax.data import toys
from genai_jax.models import gan
from genai_jax.models.gan_nets import (
    Discriminator,
    NetConfig,
    SpectralVector,
    Weight,
    power_iteration,
    spectral_sigma,
)
from genai_jax.parallel import logical_axes
from tests.conftest import overridden

DIGITS = {"kind": "image", "shape": (8, 8, 1), "num_classes": 10, "data": None}
POINTS = {"kind": "points", "shape": (2,), "num_classes": 8, "data": None}


def _config(**overrides):
    c = base_config("gan")
    c.model.update(conditional=True, z_dim=8, g_channels=4, d_channels=4, hidden=16,
                   mlp_layers=2, label_dim=4)
    c.train.update(batch_size=8, ema_decay=0.9)
    return overridden(c, overrides)


def _batch(info, n=8, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, info["num_classes"], n).astype(np.int32)
    if info["kind"] == "points":
        return {"x": rng.standard_normal((n, 2)).astype(np.float32), "label": labels}
    return {"x": rng.integers(0, 256, (n, *info["shape"])).astype(np.uint8), "label": labels}


def _changed(a, b) -> bool:
    return any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                      strict=True))


@pytest.fixture(scope="module")
def stepped():
    """A conditional image GAN with R1 and EMA, before and after one real training step."""
    config = _config(**{"model.regularization": "r1"})
    family = gan.build(config, DIGITS)
    state = jax.jit(family.init)(jax.random.PRNGKey(0))
    new_state, metrics = jax.jit(family.train_step)(state, _batch(DIGITS))
    return config, family, state, new_state, metrics


def test_one_training_step_updates_both_networks(stepped):
    _, _, state, new_state, metrics = stepped
    assert int(new_state.step) == 1
    assert _changed(state.g_params, new_state.g_params)
    assert _changed(state.d_params, new_state.d_params)
    # EMA warm-up: the decay at step 0 is min(ema_decay, 1/10).
    for old, new, ema in zip(*map(jax.tree.leaves, (state.g_params, new_state.g_params,
                                                    new_state.g_ema)), strict=True):
        np.testing.assert_allclose(ema, 0.1 * old + 0.9 * new, rtol=1e-5, atol=1e-7)
    assert new_state.sn_state is None
    assert set(metrics) == {"loss", "d_loss", "g_loss", "d_real", "d_fake", "r1", "grad_norm_d",
                            "grad_norm_g"}
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["loss"]) == pytest.approx(float(metrics["d_loss"] + metrics["g_loss"]))
    # Parameters carry logical axis names; the power-iteration vectors are not parameters.
    assert ("conv_in", "conv_out") == logical_axes(new_state.d_params)["layers"][1]["weight"][
        "kernel"][2:]
    assert not jax.tree.leaves(nnx.State(new_state.d_params).filter(SpectralVector))


def test_accumulated_step_is_the_whole_batch_step(stepped):
    """Two micro-batches of 4 give the step on the batch of 8: the same latents (drawn for the
    whole batch), D's and then G's gradients averaged, the R1 penalty on every real example."""
    _, _, state, new_state, metrics = stepped
    config = _config(**{"model.regularization": "r1", "train.grad_accum_steps": 2})
    family = gan.build(config, DIGITS)
    accumulated, accumulated_metrics = jax.jit(family.train_step)(state, _batch(DIGITS))
    for a, b in zip(jax.tree.leaves(accumulated), jax.tree.leaves(new_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for key, value in metrics.items():
        assert float(accumulated_metrics[key]) == pytest.approx(float(value), rel=1e-4), key


def test_eval_and_samples(stepped):
    _, family, _, state, _ = stepped
    metrics = jax.jit(family.eval_step)(state, _batch(DIGITS, seed=1))
    assert {"loss", "d_loss", "g_loss", "d_real", "d_fake"} <= set(metrics)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    out = family.sample(state, jax.random.PRNGKey(3), num_samples=12)
    assert out["x"].shape == (12, 8, 8, 1) and np.abs(out["x"]).max() <= 1.0
    np.testing.assert_array_equal(out["label"], np.arange(12) % 10)


def test_state_checkpoints_with_orbax(stepped, tmp_path):
    from genai_jax.train import Checkpointer

    _, _, _, state, _ = stepped
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, state, {"data_step": 1})
    restored, meta = ckpt.restore(1, jax.eval_shape(lambda: state))
    assert meta["data_step"] == 1
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("loss", gan.LOSSES)
@pytest.mark.parametrize("regularization", gan.REGULARIZATIONS)
def test_every_loss_and_regularization_trains(loss, regularization):
    config = _config(**{"model.loss": loss, "model.regularization": regularization,
                        "model.conditional": False})
    family = gan.build(config, POINTS)
    state = family.init(jax.random.PRNGKey(1))
    step = jax.jit(family.train_step)
    first, metrics = step(state, _batch(POINTS))
    second, _ = step(first, _batch(POINTS, seed=1))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert ("r1" in metrics) == (regularization == "r1")
    if regularization == "spectral_norm":  # one power-iteration step per training step
        assert _changed(state.sn_state, first.sn_state) and _changed(first.sn_state,
                                                                     second.sn_state)
    assert _changed(state.g_params, second.g_params) and _changed(state.d_params, second.d_params)


def test_losses_match_their_formulas():
    real, fake = jnp.array([2.0, -0.5]), jnp.array([0.3, -3.0])
    sig = jax.nn.sigmoid
    ns_d = -np.mean(np.log(sig(real))) - np.mean(np.log(1 - sig(fake)))
    assert float(gan.d_loss_terms("non_saturating", real, fake)) == pytest.approx(ns_d, rel=1e-5)
    ns_g = -np.mean(np.log(sig(fake)))
    assert float(gan.g_loss_terms("non_saturating", fake)) == pytest.approx(ns_g, rel=1e-5)
    hinge_d = np.mean([0.0, 1.5]) + np.mean([1.3, 0.0])
    assert float(gan.d_loss_terms("hinge", real, fake)) == pytest.approx(hinge_d, rel=1e-6)
    assert float(gan.g_loss_terms("hinge", fake)) == pytest.approx(1.35, rel=1e-6)


def test_spectral_vectors_converge_to_the_top_singular_value():
    cfg = NetConfig(shape=(8, 8, 1), d_channels=4, num_classes=10, spectral_norm=True)
    d = Discriminator(cfg, rngs=nnx.Rngs(0))
    graphdef, params, vectors = nnx.split(d, nnx.Param, SpectralVector)

    @jax.jit
    def iterate(vectors):
        def body(_, vectors):
            model = nnx.merge(graphdef, params, vectors)
            power_iteration(model)
            return nnx.state(model, SpectralVector)

        return jax.lax.fori_loop(0, 300, body, vectors)

    model = nnx.merge(graphdef, params, iterate(vectors))
    weights = [node for _, node in nnx.iter_graph(model) if isinstance(node, Weight)]
    assert len(weights) == 4  # 2 convolutions (8x8: one level), the head, the projection
    for weight in weights:
        kernel = weight.kernel[...]
        matrix = kernel.reshape(-1, kernel.shape[-1])
        top = float(jnp.linalg.svd(matrix, compute_uv=False)[0])
        assert float(spectral_sigma(kernel, weight.u[...])) == pytest.approx(top, rel=1e-4)
        normalised = weight().reshape(matrix.shape)
        assert float(jnp.linalg.norm(normalised, ord=2)) == pytest.approx(1.0, rel=1e-4)


def test_r1_penalty_equals_hand_computed_gradient_norm():
    # D(x) = sum_j v_j tanh(x W)_j: grad_x D = W (v * (1 - tanh(x W)^2)), per example.
    rng = np.random.default_rng(0)
    w, v = rng.standard_normal((3, 5)), rng.standard_normal(5)
    x = rng.standard_normal((4, 3))
    discriminator = lambda x, labels: jnp.tanh(x @ w) @ v
    grads = (v * (1 - np.tanh(x @ w) ** 2)) @ w.T  # [4, 3]
    expected = np.mean(np.sum(grads ** 2, axis=1))
    got = gan.r1_penalty(discriminator, jnp.asarray(x, jnp.float32), jnp.zeros(4, jnp.int32))
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_r1_enters_the_discriminator_loss_with_weight_gamma_over_two():
    gamma, batch, results = 10.0, _batch(POINTS), {}
    for g in (0.0, gamma):
        family = gan.build(_config(**{"model.r1_gamma": g, "model.conditional": False}), POINTS)
        state = family.init(jax.random.PRNGKey(2))  # the same for both: gamma is no shape
        results[g] = jax.jit(family.train_step)(state, batch)[1]
    r1 = float(results[gamma]["r1"])
    assert r1 > 0 and float(results[0.0]["r1"]) == pytest.approx(r1)
    assert float(results[gamma]["d_loss"] - results[0.0]["d_loss"]) == pytest.approx(
        0.5 * gamma * r1, rel=1e-4)


def test_projection_discriminator_logit_depends_on_the_label():
    cfg = NetConfig(shape=(8, 8, 1), d_channels=4, num_classes=10)
    d = Discriminator(cfg, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.PRNGKey(0), (6, 8, 8, 1), minval=-1, maxval=1)
    labels_a, labels_b = jnp.zeros(6, jnp.int32), jnp.full((6,), 7, jnp.int32)
    a, b = d(x, labels_a), d(x, labels_b)
    assert float(jnp.min(jnp.abs(a - b))) > 1e-4
    # logit = psi(phi(x)) + <embed(y), phi(x)>: the label only enters through the projection.
    phi = d.features(x)
    embed = d.embed()
    np.testing.assert_allclose(a - b, phi @ (embed[0] - embed[7]), rtol=1e-4, atol=1e-5)


def test_gan_covers_the_modes_of_the_8_gaussians_ring():
    """experiments/configs/gan_ring8.py's model, half its steps, scored by the protocol of its
    evaluation: every mode holds >= 1% of the samples within 3 std of it."""
    config = base_config("gan")
    config.model.update(conditional=False, z_dim=2, hidden=128, mlp_layers=3, r1_gamma=0.1,
                        g_learning_rate=2e-3, d_learning_rate=2e-3)
    config.train.update(batch_size=256, ema_decay=0.999)
    family = gan.build(config, {**POINTS, "num_classes": 0})
    steps, per_call = 2000, 100
    x, _, _ = toys.generate("ring8", steps * 256, seed=0)
    batches = {"x": x.reshape(steps // per_call, per_call, 256, 2),
               "label": np.zeros((steps // per_call, per_call, 256), np.int32)}
    train = jax.jit(lambda s, b: jax.lax.scan(family.train_step, s, b))
    state = family.init(jax.random.PRNGKey(0))
    for call in range(steps // per_call):
        state, metrics = train(state, jax.tree.map(lambda b, c=call: b[c], batches))
    assert np.isfinite(np.asarray(metrics["loss"])).all()
    samples = family.sample(state, jax.random.PRNGKey(1), num_samples=2000)["x"]
    coverage = toys.mode_coverage(samples)
    assert coverage["modes_covered"] == 8, coverage
    assert coverage["high_quality_fraction"] > 0.5, coverage


def test_conditional_without_labels_is_rejected():
    with pytest.raises(ConfigError, match="model.conditional") as error:
        gan.build(_config(), {**DIGITS, "num_classes": 0})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("key, value, match", [
    ("model.loss", "wasserstein", "model.loss"),
    ("model.regularization", "gp", "model.regularization"),
    ("model.r1_gamma", -1.0, "model.r1_gamma"),
])
def test_validate_names_the_bad_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        gan.validate(_config(**{key: value}))
