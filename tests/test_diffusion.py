"""The diffusion family: schedules against hand-derived values, the forward process and its
targets, the samplers against an exact oracle, guidance, the Pallas switch, and real training."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genai_jax.config import ConfigError, base_config
from genai_jax.models import diffusion
from genai_jax.sampling import diffusion as diff
from tests.conftest import overridden

T = 1000
SHAPE = (8, 8, 1)
INFO = {"kind": "image", "shape": SHAPE, "num_classes": 10, "data": None}


def tiny_config(**overrides):
    """A one-level UNet at 8x8 (width 8, attention in the middle): compiles in seconds."""
    c = base_config("diffusion")
    c.model.update(conditional=True, channels=8, channel_mult=(1,), num_res_blocks=1,
                   attention_max_side=8, num_heads=2, groups=4, label_dropout=0.2)
    c.train.update(batch_size=8, learning_rate=3e-3, warmup_steps=0, weight_decay=0.0,
                   ema_decay=0.0, steps=100)
    c.sample.update(steps=5, guidance=2.0)
    return overridden(c, overrides)


def digits_batch(n=8, offset=0):
    """Real 8x8 digits (scikit-learn's), as the data pipeline delivers them."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images[offset:offset + n] * (255 / 16)).astype(np.uint8)[..., None]
    return {"x": x, "label": d.target[offset:offset + n].astype(np.int32)}


@pytest.fixture(scope="module")
def initial_state():
    """The tiny model's initial state, shared: eps and v models have the same parameters (and
    compiling the random initialisers takes longer than a training step)."""
    return jax.jit(diffusion.build(tiny_config(), INFO).init)(jax.random.PRNGKey(0))


@pytest.fixture(scope="module", params=["eps", "v"])
def family(request, initial_state):
    fam = diffusion.build(tiny_config(**{"model.prediction": request.param}), INFO)
    return request.param, fam, initial_state, jax.jit(fam.train_step)


# --- schedules -------------------------------------------------------------------------------

def test_linear_alpha_bar_is_the_product_of_one_minus_beta():
    schedule = diff.make_schedule("linear", T)
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]  # Ho et al., t = 1..T
    for t in (1, 2, 10, 500, 1000):  # the paper's step t is index t - 1
        by_hand = 1.0
        for i in range(t):
            by_hand *= 1.0 - betas[i]
        assert schedule.alpha_bars[t - 1] == pytest.approx(by_hand, rel=1e-5)
    assert schedule.alpha_bars[0] == pytest.approx(1 - 1e-4, rel=1e-7)


def test_cosine_alpha_bar_is_f_t_over_f_0():
    schedule = diff.make_schedule("cosine", T)
    s = 0.008

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    for t in (1, 100, 500, 900, 990):
        assert schedule.alpha_bars[t - 1] == pytest.approx(f(t) / f(0), rel=1e-5, abs=1e-9)
    # f(T) = cos^2(pi/2) = 0 would make beta_T = 1: the 0.999 clip keeps alpha_bar_T positive
    assert float(schedule.betas[-1]) == pytest.approx(0.999)
    assert 0 < float(schedule.alpha_bars[-1]) < 1e-6
    assert float(jnp.max(schedule.betas)) <= 0.999 + 1e-7


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_posterior_variance(kind):
    schedule = diff.make_schedule(kind, T)
    ab, betas = np.asarray(schedule.alpha_bars, np.float64), np.asarray(schedule.betas)
    var = np.asarray(diff.posterior_variance(schedule))
    assert var[0] == 0.0  # the last step adds no noise
    for t in (1, 2, 50, 700, 998):  # 0-based indices
        by_hand = (1 - ab[t - 1]) / (1 - ab[t]) * betas[t]
        # The sampler derives beta_t = 1 - alpha_bar_t / alpha_bar_{t-1} from float32
        # alpha_bars (pallas_kernels.ddpm_coefficients): ~6e-8 absolute, 5e-4 of beta_2.
        assert var[t] == pytest.approx(by_hand, rel=1e-3)


# --- forward process and targets -------------------------------------------------------------

def test_v_prediction_identities():
    schedule = diff.make_schedule("cosine", T)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x0 = jax.random.uniform(k1, (6, *SHAPE), minval=-1, maxval=1)
    eps = jax.random.normal(k2, x0.shape)
    t = jnp.array([0, 1, 200, 500, 900, 999])
    x_t = diff.q_sample(schedule, x0, t, eps)
    v = diff.training_target("v", schedule, x0, t, eps)
    a = jnp.sqrt(schedule.alpha_bars[t])[:, None, None, None]
    s = jnp.sqrt(1 - schedule.alpha_bars[t])[:, None, None, None]
    np.testing.assert_allclose(v, a * eps - s * x0, atol=1e-6)
    np.testing.assert_allclose(a * x_t - s * v, x0, atol=1e-5)  # x0 = a x_t - s v
    np.testing.assert_allclose(s * x_t + a * v, eps, atol=1e-5)  # eps = s x_t + a v
    np.testing.assert_allclose(diff.predict_x0("v", schedule, x_t, t, v), x0, atol=1e-5)
    np.testing.assert_allclose(diff.training_target("eps", schedule, x0, t, eps), eps)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weights_the_x0_error_by_the_clamped_snr(prediction):
    """Min-SNR-gamma: whatever the target, the weighted loss of a prediction whose implied x0 is
    off by d is min(SNR_t, gamma) |d|^2 (Hang et al. 2023, eq. 10); uniform weights are 1."""
    schedule, gamma = diff.make_schedule("cosine", T), 5.0
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    x0 = jax.random.uniform(k1, (6, *SHAPE), minval=-1, maxval=1)
    eps = jax.random.normal(k2, x0.shape)
    d = 0.1 * jax.random.normal(k3, x0.shape)
    t = jnp.array([0, 30, 200, 500, 900, 999])
    x_t = diff.q_sample(schedule, x0, t, eps)
    ab = np.asarray(schedule.alpha_bars[t], np.float64)
    a, s = (jnp.sqrt(jnp.asarray(v))[:, None, None, None] for v in (ab, 1 - ab))
    eps_hat = (x_t - a * (x0 + d)) / s  # the output whose implied x0 is x0 + d
    output = eps_hat if prediction == "eps" else a * eps_hat - s * (x0 + d)
    target = diff.training_target(prediction, schedule, x0, t, eps)
    err = np.asarray(jnp.sum(jnp.square(output - target), axis=(1, 2, 3)), np.float64)
    w = np.asarray(diff.loss_weights("min_snr", prediction, schedule, t, gamma))
    expected = np.minimum(ab / (1 - ab), gamma) * np.asarray(jnp.sum(d * d, axis=(1, 2, 3)))
    np.testing.assert_allclose(w * err, expected, rtol=2e-3)
    if prediction == "eps":  # SNR exceeds gamma only near the clean end, which is turned down
        assert w[0] < 1e-3 and w[-1] == 1.0
    np.testing.assert_array_equal(diff.loss_weights("uniform", prediction, schedule, t), 1.0)


# --- samplers --------------------------------------------------------------------------------

def oracle(schedule, x0, prediction):
    """The perfect denoiser for data that is the single image x0."""
    def denoise(x_t, t, labels):
        a = jnp.sqrt(schedule.alpha_bars[t])[:, None, None, None]
        s = jnp.sqrt(1 - schedule.alpha_bars[t])[:, None, None, None]
        eps = (x_t - a * x0) / s
        return eps if prediction == "eps" else a * eps - s * x0
    return denoise


@pytest.mark.parametrize("sampler,steps,prediction,kernels", [
    ("ddim", 50, "eps", "xla"), ("ddim", 20, "v", "xla"), ("ddpm", 0, "eps", "xla"),
    ("ddpm", 50, "v", "xla"), ("ddim", 10, "eps", "pallas"), ("ddpm", 10, "v", "pallas")])
def test_perfect_oracle_recovers_x0(sampler, steps, prediction, kernels):
    schedule = diff.make_schedule("cosine", T)
    x0 = jax.random.uniform(jax.random.PRNGKey(3), SHAPE, minval=-0.9, maxval=0.9)
    x = diff.sample(oracle(schedule, x0, prediction), schedule, (3, *SHAPE),
                    jax.random.PRNGKey(1), sampler=sampler, steps=steps, eta=0.5,
                    prediction=prediction, kernels=kernels)
    np.testing.assert_allclose(x, jnp.broadcast_to(x0, x.shape), atol=2e-4)


def gaussian_oracle(schedule, mean, std, prediction):
    """The exact denoiser for data x0 ~ N(mean, std^2) per coordinate: with a = sqrt(alpha_bar_t)
    and s = sqrt(1 - alpha_bar_t), x_t ~ N(a mean, a^2 std^2 + s^2),
    E[eps | x_t] = s (x_t - a mean) / (a^2 std^2 + s^2) and E[x0 | x_t] = (x_t - s E[eps]) / a."""
    def denoise(x_t, t, labels):
        a = jnp.sqrt(schedule.alpha_bars[t])[:, None]
        s = jnp.sqrt(1 - schedule.alpha_bars[t])[:, None]
        eps = s * (x_t - a * mean) / (a**2 * std**2 + s**2)
        x0 = mean + a * std**2 * (x_t - a * mean) / (a**2 * std**2 + s**2)
        return eps if prediction == "eps" else a * eps - s * x0
    return denoise


@pytest.mark.parametrize("schedule,sampler,steps,eta,prediction", [
    ("linear", "ddpm", 0, 0.0, "eps"), ("cosine", "ddpm", 0, 0.0, "v"),
    ("cosine", "ddim", 500, 0.0, "eps"), ("linear", "ddim", 0, 1.0, "v")])
def test_samplers_reproduce_gaussian_data(schedule, sampler, steps, eta, prediction):
    """Every step matters here (unlike for a single image, which the last step alone recovers):
    wrong coefficients, variances or timestep spacing change the samples' mean and spread. Fine
    chains only: coarse ones are biased by design (50 DDIM steps give stds ~5% low, 50
    ancestral ones ~15% low: the posterior variance is the lower of DDPM's two choices)."""
    schedule = diff.make_schedule(schedule, T)
    mean, std = jnp.array([0.3, -0.5]), jnp.array([0.5, 0.2])
    x = diff.sample(gaussian_oracle(schedule, mean, std, prediction), schedule, (8000, 2),
                    jax.random.PRNGKey(0), sampler=sampler, steps=steps, eta=eta,
                    clip_x0=False, prediction=prediction)
    np.testing.assert_allclose(x.mean(0), mean, atol=0.02)
    np.testing.assert_allclose(x.std(0), std, rtol=0.03)  # standard errors: ~0.006, ~0.8%


def test_ddim_eta0_is_deterministic_and_ddpm_is_not():
    schedule = diff.make_schedule("linear", T)

    def denoiser(x_t, t, labels):  # any smooth function of (x_t, t, label)
        return 0.5 * jnp.tanh(x_t) + 1e-3 * (t + labels)[:, None, None, None]

    x_T = jax.random.normal(jax.random.PRNGKey(0), (4, *SHAPE))
    labels = jnp.arange(4)

    def run(rng, **kw):
        return diff.sample(denoiser, schedule, x_T.shape, rng, labels=labels, null_label=10,
                           x_T=x_T, steps=10, **kw)

    a, b = run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(2))
    np.testing.assert_array_equal(a, b)
    c, d = (run(jax.random.PRNGKey(i), sampler="ddpm") for i in (1, 2))
    assert float(jnp.max(jnp.abs(c - d))) > 1e-2


def test_guidance_max_t_guides_only_the_less_noisy_steps():
    """guidance_max_t = 1 guides every step, 0 none (= the conditional model), and in between
    exactly the steps below it: a run guided below T/2 equals one that switches from the
    conditional model to the guided one at the first step below T/2, and only the guided steps
    pay for the doubled (conditional + unconditional) network call."""
    schedule = diff.make_schedule("cosine", T)

    batch_sizes = []  # of the network calls, recorded as they are traced

    def denoiser(x, t, labels):  # any function of all three inputs will do
        batch_sizes.append(x.shape[0])
        return jnp.tanh(x * (1.0 + labels[:, None, None, None] / 10.0)
                        + t[:, None, None, None] / T)

    x_T = jax.random.normal(jax.random.PRNGKey(0), (4, *SHAPE))
    labels = jnp.arange(4)

    def run(**kw):
        batch_sizes.clear()
        return diff.sample(denoiser, schedule, x_T.shape, jax.random.PRNGKey(1), labels=labels,
                           null_label=10, x_T=x_T, steps=10, **kw)

    guided, unguided = run(guidance=3.0), run(guidance=1.0)
    np.testing.assert_array_equal(run(guidance=3.0, guidance_max_t=1.0), guided)
    assert batch_sizes == [8]
    np.testing.assert_array_equal(run(guidance=3.0, guidance_max_t=0.0), unguided)
    assert batch_sizes == [4]
    half = run(guidance=3.0, guidance_max_t=0.5)
    assert batch_sizes == [4, 8]
    ts, coeffs = diff.step_coefficients(schedule, "ddim", 10)
    k = int(np.sum(ts >= T / 2))  # the first k steps are unguided
    x = x_T
    for i in range(len(ts)):
        t_rows = jnp.full((4,), ts[i], jnp.int32)
        w = 1.0 if i < k else 3.0
        cond, uncond = diff.guided_output(denoiser, x, t_rows, labels, 10, w)
        c = jax.tree.map(lambda v, i=i: v[i], coeffs)
        x = diff.denoise_step(x, cond, None, c, prediction="eps", clip_x0=True,
                              guidance=None if uncond is None else w, uncond_output=uncond)
    np.testing.assert_allclose(half, x, atol=1e-5)
    assert 0 < k < len(ts) and float(jnp.max(jnp.abs(half - guided))) > 1e-3
    with pytest.raises(ConfigError, match="guidance_max_t"):
        diffusion.validate(tiny_config(**{"sample.guidance_max_t": 1.5}))


def test_respaced_ddpm_step_equals_ddim_with_eta_one():
    """DDIM(eta=1) from t to t' is the ancestral posterior of the chain respaced to (.., t', t),
    so the respaced DDPM coefficients and DDIM's must give the same x_{t'}."""
    schedule = diff.make_schedule("cosine", T)
    ts, ddpm = diff.step_coefficients(schedule, "ddpm", 25)
    ts2, ddim = diff.step_coefficients(schedule, "ddim", 25, eta=1.0)
    np.testing.assert_array_equal(ts, ts2)
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    x_t, out, noise = (jax.random.normal(key, (len(ts), 16)) for key in k)
    steps = [diff.denoise_step(x_t, out, noise, c, prediction="eps", clip_x0=False)
             for c in (ddpm, ddim)]
    np.testing.assert_allclose(steps[0], steps[1], rtol=1e-4, atol=1e-4)
    full, _ = diff.step_coefficients(schedule, "ddpm", 0)
    assert len(full) == T and full[0] == T - 1 and full[-1] == 0


@pytest.mark.parametrize("kernels", ["xla", "pallas"])
def test_guidance_weight_one_is_the_conditional_output(kernels):
    schedule = diff.make_schedule("cosine", T)
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    x_t, cond, uncond, noise = (jax.random.normal(k, (2, *SHAPE)) for k in ks)
    _, coeffs = diff.step_coefficients(schedule, "ddim", 10, eta=0.3)
    c = jax.tree.map(lambda v: v[3], coeffs)
    step = dict(prediction="v", clip_x0=True, kernels=kernels)
    plain = diff.denoise_step(x_t, cond, noise, c, **step)
    guided = diff.denoise_step(x_t, cond, noise, c, guidance=1.0, uncond_output=uncond, **step)
    np.testing.assert_allclose(guided, plain, atol=1e-5)
    # ... while w = 0 is the unconditional output and w = 3 extrapolates past the conditional
    only_uncond = diff.denoise_step(x_t, uncond, noise, c, **step)
    np.testing.assert_allclose(
        diff.denoise_step(x_t, cond, noise, c, guidance=0.0, uncond_output=uncond, **step),
        only_uncond, atol=1e-5)
    extrapolated = uncond + 3.0 * (cond - uncond)
    np.testing.assert_allclose(
        diff.denoise_step(x_t, cond, noise, c, guidance=3.0, uncond_output=uncond, **step),
        diff.denoise_step(x_t, extrapolated, noise, c, **step), atol=1e-4)


# --- the networks and the family ---------------------------------------------------------

@pytest.mark.parametrize("shape,sides", [((8, 8, 1), [(8, 8), (4, 4)]),
                                         ((28, 28, 1), [(28, 28), (14, 14), (7, 7)]),
                                         ((32, 32, 3), [(32, 32), (16, 16), (8, 8)]),
                                         ((2,), None)])
def test_denoiser_for_each_data_shape(shape, sides):
    from flax import nnx

    from genai_jax.nn import unet

    cfg = unet.UNetConfig(shape=shape, num_classes=10, channels=8, channel_mult=(1, 2, 2),
                          num_res_blocks=1, attention_max_side=8, num_heads=2, groups=4,
                          mlp_width=16, mlp_depth=2)
    if sides:
        assert unet.resolutions(shape[0], shape[1], 3) == sides
    def apply(x):  # traced only: shapes, no compilation
        model = unet.make_denoiser(cfg, nnx.Rngs(0))
        return model(x, jnp.zeros(4, jnp.int32), jnp.full(4, 10))

    out = jax.eval_shape(apply, jax.ShapeDtypeStruct((4, *shape), jnp.float32))
    assert out.shape == (4, *shape)


def test_conditional_without_labels_is_one_config_error():
    with pytest.raises(ConfigError) as err:
        diffusion.build(tiny_config(), {**INFO, "num_classes": 0})
    assert "model.conditional=True needs class labels" in str(err.value)
    assert "\n" not in str(err.value)


def test_guidance_without_label_dropout_is_rejected():
    from genai_jax import config as config_lib

    with pytest.raises(ConfigError, match="model.label_dropout"):
        config_lib.validate(tiny_config(**{"model.label_dropout": 0.0}))


def test_eps_prediction_on_points_is_rejected():
    with pytest.raises(ConfigError, match="model.prediction=v"):
        diffusion.build(tiny_config(**{"model.conditional": False}),
                        {"kind": "points", "shape": (2,), "num_classes": 0, "data": None})


def test_one_real_training_step(family):
    prediction, fam, state, step = family
    first, metrics = step(state, digits_batch())
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    assert int(first.step) == 1

    def changed(a, b):
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(a)]
        pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        return {p: not np.allclose(x, y) for p, (x, y) in zip(paths, pairs, strict=True)}

    # The zero-initialised output conv blocks every other gradient until it has moved once.
    moved = changed(state.params, first.params)
    assert [v for p, v in moved.items() if "conv_out" in p] == [True, True]
    # ... and each ResBlock's zero-initialised conv2 its other layers: three steps reach all.
    third, metrics = step(step(first, digits_batch(offset=8))[0], digits_batch(offset=16))
    moved = changed(state.params, third.params)
    assert np.isfinite(float(metrics["loss"])) and all(moved.values()), moved


def test_short_run_lowers_the_held_out_loss(family):
    """40 steps on 64 real digits: the deterministic eval loss on other digits falls."""
    prediction, fam, state, step = family
    eval_step = jax.jit(fam.eval_step)
    held_out = digits_batch(64, offset=1000)
    metrics = eval_step(state, held_out)
    assert metrics.keys() == {"loss", "loss_t0", "loss_t1", "loss_t2", "loss_t3"}
    # 4 buckets of 16 rows each: their mean is the overall loss
    assert float(metrics["loss"]) == pytest.approx(
        np.mean([float(metrics[f"loss_t{b}"]) for b in range(4)]), rel=1e-5)
    before = float(metrics["loss"])
    train = digits_batch(64)
    for i in range(40):
        rows = slice(8 * (i % 8), 8 * (i % 8) + 8)
        state, _ = step(state, {k: v[rows] for k, v in train.items()})
    after = float(eval_step(state, held_out)["loss"])
    assert after < 0.8 * before, (before, after)


def test_samples_and_trajectory_strip(family, tmp_path):
    from PIL import Image

    prediction, fam, state, _ = family
    if prediction != "eps":
        pytest.skip("one parameterization is enough")
    out = fam.sample(state, jax.random.PRNGKey(0), num_samples=12)
    assert out["x"].shape == (12, *SHAPE) and np.all(np.abs(out["x"]) <= 1)
    summary = fam.save_samples(out, str(tmp_path), 7)
    strip = Image.open(tmp_path / "trajectory_00000007.png")
    # 8 samples x 5 columns (every step of a 5-step DDIM) of 8x8 digits enlarged 4x, 1px pad
    assert strip.size == (5 * 33 + 1, 8 * 33 + 1) and "trajectory" in summary


@pytest.mark.slow
def test_pallas_kernels_match_xla():
    """The same two-level tiny UNet with the fused Pallas GroupNorm (interpret mode on the CPU)
    and with jnp ops: the held-out loss and every gradient of it (what one optimizer step
    applies; the optimizer is the same code either way) agree.

    Tolerance: both compute float32 two-pass statistics of the same formula, so they differ
    only in summation order (~1e-7 relative per reduction); through ~20 layers that stays
    below 1e-5 relative on the loss, and 1e-4 of each gradient array's largest entry.
    """
    two_levels = {"model.channel_mult": (1, 2), "model.attention_max_side": 4}
    fams = {k: diffusion.build(tiny_config(**{"model.kernels": k, **two_levels}), INFO)
            for k in ("xla", "pallas")}
    state = jax.jit(fams["xla"].init)(jax.random.PRNGKey(0))
    # Zero-initialised output convs would leave most gradients exactly zero: perturb them.
    leaves, treedef = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(treedef, [p + 0.05 * jax.random.normal(k, p.shape)
                                          for p, k in zip(leaves, keys, strict=True)])
    state = state.replace(params=params)
    batch = digits_batch()
    results = {}
    for kernels, fam in fams.items():
        def loss(p, fam=fam):
            return fam.eval_step(state.replace(params=p), batch)["loss"]
        results[kernels] = jax.jit(jax.value_and_grad(loss))(params)
    (loss_x, grads_x), (loss_p, grads_p) = results["xla"], results["pallas"]
    assert float(loss_p) == pytest.approx(float(loss_x), rel=1e-5)
    for gx, gp in zip(jax.tree.leaves(grads_x), jax.tree.leaves(grads_p), strict=True):
        np.testing.assert_allclose(gp, gx, atol=1e-4 * float(jnp.max(jnp.abs(gx))) + 1e-8)
