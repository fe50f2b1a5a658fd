"""Differentially private training: the accountant against TensorFlow Privacy's published table,
DP-SGD's gradient against a hand-written loop, its noise, Poisson sampling, the families under
DP-SGD, and a private run through the trainer (epsilon logged, settings part of the run)."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from scipy import stats

from genai_jax.config import ConfigError, base_config
from genai_jax.data import private
from genai_jax.errors import UserError
from genai_jax.optim import DpSgd, TrainState, make_train_step
from genai_jax.privacy import accounting, audit
from genai_jax.train import prepare, read_metrics, train
from tests.conftest import image_data_config, overridden, tiny_lm_config

MNIST = 60_000


@pytest.mark.parametrize("noise, epochs, published", [(1.12, 60, 2.92), (0.6, 30, 9.74),
                                                      (1.2, 10, 1.20)])
def test_accountant_reproduces_tf_privacy_mnist_table(noise, epochs, published):
    """TF Privacy's tutorials README: MNIST (N = 60,000), batch 256, delta 1e-5, RDP at its
    orders with the classic conversion; dp-accounting's own conversion is tighter."""
    q, steps = 256 / MNIST, math.ceil(epochs * MNIST / 256)
    classic = accounting.classic_rdp_epsilon(q, noise, steps, 1e-5)
    assert abs(classic - published) <= 0.05, classic
    assert accounting.epsilon(q, noise, steps, 1e-5, "rdp") < classic
    assert accounting.epsilon(q, noise, steps, 1e-5, "pld") < classic


def privacy_train_cfg(**privacy):
    c = base_config()
    c.train.update(steps=1000, batch_size=256, grad_clip=0.0)
    c.train.privacy.update(privacy)
    return c.train


def test_noise_is_solved_from_a_target_epsilon_and_overspending_is_refused():
    plan = accounting.plan(privacy_train_cfg(target_epsilon=3.0), MNIST)
    assert 2.99 <= plan.epsilon() <= 3.0
    assert plan.epsilon(500) < plan.epsilon() and plan.epsilon(0) == 0.0
    louder = accounting.plan(privacy_train_cfg(noise_multiplier=plan.noise_multiplier * 1.1,
                                               target_epsilon=3.0), MNIST)
    assert louder.epsilon() < 3.0
    with pytest.raises(ConfigError, match="target_epsilon=3.0 is exceeded"):
        accounting.plan(privacy_train_cfg(noise_multiplier=plan.noise_multiplier * 0.9,
                                          target_epsilon=3.0), MNIST)
    with pytest.raises(ConfigError, match="out of reach"):
        accounting.plan(privacy_train_cfg(target_epsilon=1e-4), 300)
    with pytest.raises(ConfigError, match="exceeds the 100 privacy units"):
        accounting.plan(privacy_train_cfg(noise_multiplier=1.0), 100)


def regression_loss(params, batch, rng):
    """A mean over the batch, as every family's loss is; `rng` unused."""
    del rng
    pred = jnp.tanh(batch["x"] @ params["w"]) @ params["v"]
    err = jnp.mean((pred - batch["y"]) ** 2, axis=-1)
    return err.mean(), {"err": err.mean()}


def regression_problem(n=12, seed=0):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32),
              "v": jnp.asarray(rng.normal(size=(7, 3)), jnp.float32)}
    batch = {"x": rng.normal(size=(n, 5)).astype(np.float32) * np.linspace(0.1, 3, n)[:, None],
             "y": rng.normal(size=(n, 3)).astype(np.float32),
             "example_mask": np.array([1.0] * (n - 3) + [0.0] * 3, np.float32)}
    return params, batch


@pytest.mark.parametrize("accum_steps, chunk", [(1, 0), (2, 2), (3, 4)])
def test_zero_noise_update_equals_a_loop_of_clipped_per_example_gradients(accum_steps, chunk):
    params, batch = regression_problem()
    clip, expected = 0.5, 8
    hand = jax.tree.map(jnp.zeros_like, params)
    for i in np.flatnonzero(batch["example_mask"]):
        one = {k: v[i:i + 1] for k, v in batch.items() if k != "example_mask"}
        g = jax.grad(lambda p, b=one: regression_loss(p, b, None)[0])(params)
        scale = min(1.0, clip / float(optax.global_norm(g)))
        hand = jax.tree.map(lambda h, x, s=scale: h + s * x, hand, g)
    hand = jax.tree.map(lambda h: h / expected, hand)

    tx = optax.sgd(1.0)
    step = make_train_step(regression_loss, tx, accum_steps=accum_steps,
                           privacy=DpSgd(clip, 0.0, expected, chunk))
    state = TrainState.create(params, tx, jax.random.PRNGKey(0))
    new, metrics = jax.jit(step)(state, batch)
    for name in params:  # sgd(1): the update is minus the gradient
        np.testing.assert_allclose(params[name] - new.params[name], hand[name], rtol=2e-5,
                                   atol=1e-6)
    real = batch["example_mask"] == 1
    losses = [float(regression_loss(params, {k: v[i:i + 1] for k, v in batch.items()}, None)[0])
              for i in np.flatnonzero(real)]
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-5)
    assert 0.0 < float(metrics["clipped_fraction"]) <= 1.0


def test_noise_has_the_stated_standard_deviation():
    """With every row padding, the gradient is the noise alone over the expected batch."""
    params = {"w": jnp.zeros((400, 250)), "v": jnp.zeros((250, 3))}
    batch = {"x": np.ones((4, 400), np.float32), "y": np.ones((4, 3), np.float32),
             "example_mask": np.zeros(4, np.float32)}
    clip, noise, expected = 2.0, 1.5, 10
    tx = optax.sgd(1.0)
    step = jax.jit(make_train_step(regression_loss, tx,
                                   privacy=DpSgd(clip, noise, expected)))
    state = TrainState.create(params, tx, jax.random.PRNGKey(3))
    new, _ = step(state, batch)
    z = -np.concatenate([np.ravel(new.params[k]) for k in params])
    assert abs(z.std() / (noise * clip / expected) - 1) < 0.01 and abs(z.mean()) < 0.003
    assert stats.normaltest(z).pvalue > 1e-4
    again, _ = step(new, batch)  # fresh noise every step
    z2 = np.concatenate([np.ravel(new.params[k] - again.params[k]) for k in params])
    assert abs(np.corrcoef(z, z2)[0, 1]) < 0.02


def test_poisson_batches_sample_each_unit_with_probability_q():
    n, expected, steps = 500, 20, 400
    cap = private.poisson_cap(n, expected, steps, multiple=8)
    assert cap % 8 == 0 and steps * stats.binom.sf(cap, n, expected / n) < 1e-9
    units = private.WindowUnits(np.arange(n * 5 + 3), 4)
    assert len(units) == n and list(units[2]["inputs"]) == [10, 11, 12, 13]
    assert list(units[2]["targets"]) == [11, 12, 13, 14]  # windows of 5 tokens, apart
    c = base_config()
    batches = private.private_batches(units, c.train.privacy, expected, steps, seed=1,
                                      multiple=8)
    assert batches.batch_size == cap
    sizes, seen = [], np.zeros(n)
    for s in range(steps):
        b = batches.batch(s)
        k = int(b["example_mask"].sum())
        assert b["example_mask"].shape == (cap,) and b["example_mask"][:k].all()
        firsts = b["inputs"][:k, 0] // 5
        assert len(set(firsts)) == k  # distinct units
        seen[firsts] += 1
        sizes.append(k)
    assert abs(np.mean(sizes) - expected) < 0.5 and np.std(sizes) > 2  # a variable size
    assert stats.chisquare(seen).pvalue > 1e-4  # every unit alike
    two_hosts = [batches.batch(7, p, 2) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["inputs"] for h in two_hosts]),
                                  batches.batch(7)["inputs"])


def family_under_dp(family: str, config, info: dict):
    from genai_jax import models

    fam = models.build(config, {**info, "noise_multiplier": 0.0})
    state = jax.jit(fam.init)(jax.random.PRNGKey(0))
    return fam, state


def image_dp_config(family: str):
    c = base_config(family)
    if family == "vae":
        c.model.update(latent_dim=4, channels=8, stages=1, blocks=1, hidden=16)
    elif family == "gan":
        c.model.update(conditional=True, z_dim=8, g_channels=8, d_channels=8, hidden=16,
                       label_dim=8)
    else:
        c.model.update(channels=8, channel_mult=(1,), num_res_blocks=1, attention_max_side=0,
                       num_heads=2, groups=4)
    c.data = image_data_config("digits")
    c.train.update(batch_size=4, grad_clip=0.0, warmup_steps=0)
    c.train.privacy.update(noise_multiplier=0.0, per_example_chunk=2)
    return overridden(c, {})


# (The UNet and the GAN compile for 15-30 s each under DP on 2 cores: slow, for make test's
# 25-minute budget; make test-all runs them.)
@pytest.mark.parametrize("family", ["transformer", "vae",
                                    pytest.param("diffusion", marks=pytest.mark.slow),
                                    pytest.param("gan", marks=pytest.mark.slow)])
def test_padding_rows_do_not_reach_the_update(family):
    """Under DP-SGD only real rows count: changing a padding row's data leaves the step's
    result unchanged, changing a real row's changes it (the GAN: D's and, through D, G's)."""
    if family == "transformer":
        from genai_jax.tokenization import make_tokenizer

        config = tiny_lm_config(**{"train.grad_clip": 0.0, "train.warmup_steps": 0,
                                   "train.privacy.noise_multiplier": 0.0})
        tok = make_tokenizer("byte", b"", "test")
        info = {"tokenizer": tok, "bytes_per_token": 1.0}
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (4, 17)).astype(np.int32)
        batch = {"inputs": x[:, :-1], "targets": x[:, 1:]}
        key = "inputs"
    else:
        config = image_dp_config(family)
        info = {"kind": "image", "shape": (8, 8, 1), "num_classes": 10, "data": None}
        rng = np.random.default_rng(0)
        batch = {"x": rng.integers(0, 256, (4, 8, 8, 1)).astype(np.uint8),
                 "label": np.arange(4, dtype=np.int32)}
        key = "x"
    batch["example_mask"] = np.array([1, 1, 1, 0], np.float32)
    fam, state = family_under_dp(family, config, info)
    step = jax.jit(fam.train_step)

    def changed(row):
        other = {k: v.copy() for k, v in batch.items()}
        other[key][row] = other[key][(row + 1) % 4]
        return other

    base, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and "clipped_fraction" in metrics
    leaves = lambda s: jax.tree.leaves(s.d_params if family == "gan" else s.params)
    same, _ = step(state, changed(3))
    assert all(np.array_equal(a, b) for a, b in zip(leaves(base), leaves(same), strict=True))
    moved, _ = step(state, changed(0))
    assert not all(np.array_equal(a, b) for a, b in zip(leaves(base), leaves(moved),
                                                         strict=True))


@pytest.fixture(scope="module")
def private_run(text_file, tmp_path_factory):
    """A DP-SGD run that an audit can read: half its windows held out, two canaries."""
    workdir = tmp_path_factory.mktemp("private")
    config = tiny_lm_config(**{"data.path": str(text_file), "train.grad_clip": 0.0,
                               "model.block_size": 32, "data.nonmember_fraction": 0.5,
                               "data.canaries": 2, "data.canary_repeats": 3,
                               "train.steps": 10, "train.batch_size": 8,
                               "train.grad_accum_steps": 2, "eval.every": 10,
                               "checkpoint.every": 10, "train.privacy.noise_multiplier": 1.0,
                               "train.privacy.per_example_chunk": 2})
    return train(config, workdir, progress=False), config, workdir


def test_a_private_run_logs_epsilon_and_keeps_its_settings(private_run, text_file):
    run, config, workdir = private_run
    metrics = [m for m in read_metrics(workdir) if "train/loss" in m]
    eps = [m["privacy/epsilon"] for m in metrics]
    assert [m["step"] for m in metrics] == [5, 10] and eps[0] < eps[1]
    assert eps[1] == pytest.approx(run.privacy.epsilon(), rel=1e-9)
    units = len(text_file.read_text()) * 0.9 // 33 // 2  # half of them held out
    assert abs(run.privacy.units - units) <= 1 and run.privacy.expected_batch == 8
    saved = json.loads((workdir / "privacy.json").read_text())
    assert saved["epsilon_after_all_steps"] == pytest.approx(eps[1])
    assert saved["noise_multiplier"] == 1.0 and saved["matches_accountant"]
    assert saved["batch_cap"] == run.pipeline.train.batch_size
    assert 0 < saved["cap_overflow_probability"] < 1e-9
    # the batches are padded to the cap, a multiple of the micro-batches and the chunk
    assert run.pipeline.train.batch_size % 4 == 0 and run.pipeline.train.batch_size > 8
    # resuming with other privacy settings is refused
    other = ml_collections.ConfigDict(config.to_dict())
    other.train.privacy.noise_multiplier = 0.5
    with pytest.raises(UserError, match="train.privacy.noise_multiplier: 1.0 -> 0.5"):
        prepare(other, workdir)


@pytest.mark.parametrize("overrides, message", [
    ({"train.privacy.noise_multiplier": 1.0}, "set --config.train.grad_clip=0"),
    ({"train.grad_clip": 0.0, "train.privacy.target_epsilon": 1e-3},
     "target_epsilon=0.001 is out of reach"),
    ({"train.grad_clip": 0.0, "train.privacy.noise_multiplier": 1.0,
      "train.privacy.sampling": "random"}, "train.privacy.sampling='random' is not one of"),
    ({"train.grad_clip": 0.0, "train.privacy.noise_multiplier": 1.0,
      "train.privacy.per_example_chunk": 3}, "must divide the micro-batch of 4"),
])
def test_bad_privacy_settings_are_one_line_before_compiling(overrides, message, text_file,
                                                           tmp_path):
    config = tiny_lm_config(**{"data.path": str(text_file), **overrides})
    with pytest.raises(UserError, match=message):
        prepare(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_audit_units_split_at_random_and_canaries_are_written_in():
    from genai_jax.tokenization import make_tokenizer

    members, nonmembers = private.split_units(100, 0.3, 50, seed=0)
    assert len(members) == 50 and len(nonmembers) == 30
    assert not set(members) & set(nonmembers) and max(members) > 80 and min(nonmembers) < 20
    tok = make_tokenizer("byte", b"", "test")
    secrets = private.canary_secrets(3, seed=0)
    assert all(len(s.split()) == 6 and s.replace(" ", "").isdigit() for s in secrets)
    encode = lambda text: tok.encode(text, "a canary")
    patches = private.canary_patches(secrets, encode, members, 4, 31, seed=0)
    assert len(patches) == 12 and set(patches) <= set(members)
    units = private.WindowUnits(np.full(100 * 32, ord("x"), np.int32), 31, patches=patches)
    texts = [tok.decode(units.unit_tokens(u)) for u in patches]
    for s in secrets:
        assert sum(private.CANARY_PREFIX + s in t for t in texts) == 4
    with pytest.raises(UserError, match="longer than the context"):
        private.canary_patches(secrets, encode, members, 1, 16, seed=0)
    with pytest.raises(UserError, match="need as many training units"):
        private.canary_patches(secrets, encode, members, 20, 31, seed=0)


class BigramScorer(audit.LMScorer):
    """`LMScorer` with a random bigram table for a model, log p(b | a) = table[a, b], whose
    "cache" is nothing: the last token is all a bigram needs."""

    def __post_init__(self):
        rng = np.random.default_rng(0)
        self.table = np.asarray(jax.nn.log_softmax(rng.normal(size=(256, 256)) * 3))
        self._empty_cache = lambda rows, length: np.zeros(rows)

    def _extend(self, params, tokens, start, cache):
        return self.table[tokens], cache


def test_exposure_ranks_the_secret_among_all_a_million_candidates():
    from genai_jax.tokenization import make_tokenizer

    scorer = BigramScorer(None, None, make_tokenizer("byte", b"", "test"))
    table, space = scorer.table, ord(" ")
    last = ord(private.CANARY_PREFIX[-1])
    digits = np.arange(10) + ord("0")
    # every candidate's log-likelihood, by brute force over the 10^6 of them
    score = np.zeros([10] * 6)
    for k in range(6):
        prev = (np.full(10, last) if k == 0 else np.full(10, space))
        shape = [1] * 6
        shape[k] = 10
        score = score + table[prev, digits].reshape(shape)
        if k < 5:
            score = score + table[digits, space].reshape(shape)
    score = score.ravel()
    for secret in ["0 0 0 0 0 0", "4 8 1 5 9 2", "9 9 9 9 9 9"]:
        index = int(secret.replace(" ", ""))
        rank = 1 + np.sum(score > score[index])
        # (float32 sums in another order: near-ties may swap, within a few ranks)
        assert scorer.exposure(secret) == pytest.approx(np.log2(1e6) - np.log2(rank), abs=0.01)
    best = "{} {} {} {} {} {}".format(*np.unravel_index(np.argmax(score), [10] * 6))
    assert scorer.exposure(best) == pytest.approx(np.log2(1e6))


def test_roc_of_separated_and_of_identical_scores():
    a = audit.roc(np.arange(100) + 100.0, np.arange(100.0))
    assert a["auc"] == 1.0 and a["tpr_at_1pct_fpr"] == 1.0
    same = np.random.default_rng(0).normal(size=4000)
    b = audit.roc(same[:2000], same[2000:])
    assert abs(b["auc"] - 0.5) < 0.03 and b["tpr_at_1pct_fpr"] < 0.05


def test_privacy_audit_reports_membership_canaries_and_epsilon(private_run, env):
    import subprocess
    import sys

    from tests.conftest import ROOT

    _, _, workdir = private_run
    done = subprocess.run([sys.executable, "-m", "experiments.privacy_audit",
                           f"--workdir={workdir}", "--max_examples=200"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == json.loads((workdir / "privacy_audit.json").read_text())
    m = report["membership"]
    assert m["members"] == m["nonmembers"] == 200 and 0.0 <= m["auc"] <= 1.0
    c = report["canaries"]
    assert c["count"] == 2 and c["repeats"] == 3 and c["candidates"] == 10**6
    assert all(0.0 <= e <= np.log2(1e6) + 1e-9 for e in c["exposure_bits"])
    p = report["privacy"]
    assert p["epsilon"] == pytest.approx(json.loads((workdir / "privacy.json").read_text())[
        "epsilon_after_all_steps"])
    assert p["canary_group_epsilon_bound"] == pytest.approx(3 * p["epsilon"])
    assert (workdir / "privacy_audit.png").stat().st_size > 10_000


def test_shuffled_private_batches_are_fixed_and_cover_each_epoch():
    units = private.WindowUnits(np.arange(40 * 5), 4)
    c = base_config()
    c.train.privacy.sampling = "shuffle"
    batches = private.private_batches(units, c.train.privacy, 8, 100, seed=2)
    assert batches.batch_size == 8
    epoch = [batches.batch(s) for s in range(5)]  # 40 units, 8 per step
    assert all(b["example_mask"].tolist() == [1.0] * 8 for b in epoch)
    assert sorted(np.concatenate([b["inputs"][:, 0] // 5 for b in epoch])) == list(range(40))


def test_an_image_audit_split_trains_on_members_only():
    from genai_jax.data import build

    c = base_config("vae")
    c.data = image_data_config("digits", nonmember_fraction=0.5)
    c.train.batch_size = 64
    pipeline = build(overridden(c, {}), "image")
    audit_split = pipeline.info["audit"]
    members, nonmembers = audit_split["members"], audit_split["nonmembers"]
    assert not set(members) & set(nonmembers)
    assert len(members) + len(nonmembers) == len(audit_split["units"])
    assert pipeline.info["privacy_units"] == len(members)
    pixels = lambda i: audit_split["units"][int(i)]["x"].tobytes()
    member_images = {pixels(i) for i in members}
    nonmember_images = {pixels(i) for i in nonmembers} - member_images  # (duplicates aside)
    seen = {x.tobytes() for s in range(3) for x in pipeline.train.batch(s)["x"]}
    assert seen <= member_images and not seen & nonmember_images


def test_image_membership_scores_are_the_familys_evaluation_of_one_image():
    """`audit.ImageScorer`: an image's membership loss is the family's held-out evaluation of
    that image alone (the VAE's NLL bound, its draws by the image's index)."""
    from genai_jax import models

    c = base_config("vae")
    c.model.update(latent_dim=4, channels=8, stages=1, blocks=1, hidden=16)
    c.eval.update(iw_samples=4, iw_chunk=2)
    config = overridden(c, {})
    fam = models.build(config, {"kind": "image", "shape": (8, 8, 1), "num_classes": 10,
                                "data": None})
    state = jax.jit(fam.init)(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    examples = {"x": rng.integers(0, 256, (5, 8, 8, 1)).astype(np.uint8),
                "label": np.arange(5, dtype=np.int32), "index": np.arange(10, 15, dtype=np.int32)}
    losses = audit.ImageScorer("vae", fam, state, chunk=4).example_losses(examples)
    alone = [float(jax.jit(fam.eval_step)(state, {k: v[i:i + 1] for k, v in examples.items()})
                   ["nll_nats"]) for i in range(5)]
    np.testing.assert_allclose(losses, alone, rtol=1e-4)


# (Training and auditing a VAE: ~15 s, slow for make test's budget; the scorer's own test
# above stays in it.)
@pytest.mark.slow
def test_privacy_audit_of_an_image_run(tmp_path):
    from experiments import privacy_audit

    c = base_config("vae")
    c.model.update(latent_dim=4, channels=8, stages=1, blocks=1, hidden=16)
    c.data = image_data_config("digits", nonmember_fraction=0.5, max_members=32)
    c.train.update(steps=4, batch_size=8, log_every=4, warmup_steps=0)
    c.eval.update(every=4, steps=1, num_samples=0, iw_samples=4, iw_chunk=2)
    c.checkpoint.every = 4
    train(overridden(c, {}), tmp_path, progress=False)
    report, curves = privacy_audit.audit_run(str(tmp_path), None, 24)
    membership = report["membership"]
    assert membership["members"] == membership["nonmembers"] == 24
    assert 0 <= membership["auc"] <= 1 and "loss" in curves
    assert report["privacy"] is None and "eval_nll_nats" in report
    assert "canaries" not in report
