"""Federated training: partitions into clients, the rounds' rows, the round against a
hand-written FedAvg, client isolation, DP-FedAvg's clipping, noise and accountant, and federated
runs through the trainer (exact resume per round, bad input refused before compiling)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from genai_jax.data import federated
from genai_jax.errors import UserError
from genai_jax.optim import FedAvg
from genai_jax.optim.federated import client_updates, make_round_step
from genai_jax.optim.state import TrainState
from genai_jax.privacy import accounting
from genai_jax.train import prepare, read_metrics, train
from tests.conftest import image_data_config, overridden, tiny_lm_config

SPEAKERS = ("ROMEO", "JULIET", "NURSE", "First Citizen", "MERCUTIO", "FRIAR LAURENCE")


@pytest.fixture(scope="module")
def play_file(tmp_path_factory):
    """A play: speeches of six speakers, each with words of its own (so a client's data says
    who it is), in the layout of tiny shakespeare."""
    rng = np.random.default_rng(0)
    speeches = []
    for i in range(240):
        speaker = SPEAKERS[int(rng.integers(0, len(SPEAKERS))) if i else 0]
        words = [f"{speaker.lower()[:3]}{j}" for j in rng.integers(0, 5, 6 + i % 9)]
        speeches.append(f"{speaker}:\n{' '.join(words).capitalize()},\nand so on.\n")
    path = tmp_path_factory.mktemp("play") / "play.txt"
    path.write_text("\n".join(speeches))
    return path


def test_speeches_group_by_speaker_with_their_headings():
    text = ("ROMEO:\nBut soft!\nWhat light?\n\nJULIET:\nAy me.\n\nMore of hers.\n\n"
            "ROMEO:\nShe speaks.\n")
    parsed = federated.speeches(text)
    assert [s for s, _ in parsed] == ["ROMEO", "JULIET", "JULIET", "ROMEO"]
    assert parsed[0][1] == "ROMEO:\nBut soft!\nWhat light?\n\n"
    codes = lambda s: [ord(c) for c in s]
    streams, names = federated.by_speaker(text, codes, 0)
    assert names == ["ROMEO", "JULIET"]  # most text first
    assert "".join(chr(t) for t in streams[0]) == (
        "ROMEO:\nBut soft!\nWhat light?\n\nROMEO:\nShe speaks.\n\n")
    streams, names = federated.by_speaker(text, codes, 1)
    assert names == ["ROMEO"] and len(streams) == 1
    with pytest.raises(UserError, match="no speaker headings"):
        federated.by_speaker("just prose, no play\n\nat all", codes, 0)
    with pytest.raises(UserError, match="has 2 speakers"):
        federated.by_speaker(text, codes, 3)


def test_iid_and_label_skew_partitions_cover_the_data_once():
    parts = federated.iid(103, 10, seed=0)
    assert sorted(len(p) for p in parts) == [10] * 7 + [11] * 3
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(103))
    labels = np.repeat(np.arange(10), 60)
    skewed = federated.label_skew(labels, 10, alpha=0.1, seed=0)
    assert np.array_equal(np.sort(np.concatenate(skewed)), np.arange(600))
    # a small alpha gives each client few classes; a large one nearly all ten
    classes = lambda parts: np.mean([len(np.unique(labels[p])) for p in parts])
    assert classes(skewed) < 5 < 9.5 < classes(federated.label_skew(labels, 5, 100.0, seed=0))
    with pytest.raises(UserError, match="some client would be empty"):
        federated.iid(5, 6, seed=0)
    with pytest.raises(UserError, match="leaves .* clients without examples"):
        federated.label_skew(labels, 200, alpha=0.01, seed=0)


def test_rounds_read_the_selected_clients_examples_by_seed_and_round():
    members = federated.iid(60, 6, seed=0)
    source = [{"x": np.float32(i)} for i in range(60)]
    clients = federated.IndexedClients(source, members)
    rounds = lambda: federated.ClientRounds(clients, 3, False, slots=4, local_examples=5, seed=1)
    a, b = rounds(), rounds()
    rows = [a[i] for i in range(2 * 20)]  # two rounds of 4 slots x 5 examples
    again = [b[i] for i in reversed(range(2 * 20))][::-1]  # another reader, another order
    assert all(r == s for r, s in zip(rows, again, strict=True))
    for round_ in range(2):
        chosen = a.clients_of(round_)
        assert len(set(chosen.tolist())) == 3
        for slot in range(4):
            block = rows[round_ * 20 + slot * 5:round_ * 20 + (slot + 1) * 5]
            mask = {r[federated.MASK] for r in block}
            if slot < 3:  # its client's own examples, and its weight: the client's size
                own = set(members[chosen[slot]].tolist())
                assert {int(r["x"]) for r in block} <= own and mask == {1.0}
                assert {r[federated.WEIGHT] for r in block} == {len(own)}
            else:
                assert mask == {0.0}  # a padding slot
    assert not np.array_equal(a.clients_of(0), a.clients_of(1))
    # Poisson-sampled (DP-FedAvg): each client with probability 3/6, so the count varies
    poisson = federated.ClientRounds(clients, 3, True, slots=6, local_examples=1, seed=1)
    counts = [len(poisson.clients_of(r)) for r in range(400)]
    assert len(set(counts)) > 3 and abs(np.mean(counts) - 3) < 0.25


def test_by_size_rounds_draw_clients_in_proportion_to_their_data_weighted_equally():
    members = [np.arange(0, 5), np.arange(5, 20), np.arange(20, 60)]  # sizes 5, 15, 40
    source = [{"x": np.float32(i)} for i in range(60)]
    clients = federated.IndexedClients(source, members)
    rounds = federated.ClientRounds(clients, 4, False, slots=4, local_examples=6, seed=2,
                                    by_size=True)
    drawn = np.concatenate([rounds.clients_of(r) for r in range(1500)])
    assert len(drawn) == 6000
    frequencies = np.bincount(drawn, minlength=3) / len(drawn)
    assert np.allclose(frequencies, [5 / 60, 15 / 60, 40 / 60], atol=0.02)
    twice = next(r for r in range(50) if len(set(rounds.clients_of(r).tolist())) < 4)
    rows = [rounds[twice * 24 + i] for i in range(24)]
    assert {r[federated.WEIGHT] for r in rows} == {1.0}  # equal weights
    assert {r[federated.MASK] for r in rows} == {1.0}
    blocks = {}
    for slot, client in enumerate(rounds.clients_of(twice).tolist()):
        xs = [int(r["x"]) for r in rows[slot * 6:(slot + 1) * 6]]
        assert set(xs) <= set(members[client].tolist())  # its own examples
        blocks.setdefault(client, []).append(xs)
    # a client drawn twice in a round reads two draws of its examples
    assert any(len(b) > 1 and b[0] != b[1] for b in blocks.values())


def test_short_speakers_are_padded_windows_with_a_loss_mask():
    clients = federated.StreamClients([np.arange(3, dtype=np.int32) + 1,
                                       np.arange(50, dtype=np.int32)], block_size=8)
    short = clients.example(0, int(clients.draw(0, 1, np.random.default_rng(0))[0]))
    assert short["inputs"].tolist() == [1, 2, 3, 0, 0, 0, 0, 0]
    assert short["targets"][:2].tolist() == [2, 3]
    assert short["loss_mask"].tolist() == [1, 1] + [0] * 6
    offsets = clients.draw(1, 200, np.random.default_rng(0))
    assert offsets.min() >= 0 and offsets.max() == 50 - 9
    assert clients.example(1, 5)["loss_mask"].sum() == 8


def regression_loss(params, batch, rng):
    del rng
    err = jnp.mean((jnp.tanh(batch["x"] @ params["w"]) @ params["v"] - batch["y"]) ** 2, -1)
    return err.mean(), {"err": err.mean()}


def regression_round(slots=3, local_steps=2, local_batch=4, seed=0):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32),
              "v": jnp.asarray(rng.normal(size=(7, 3)), jnp.float32)}
    n = slots * local_steps * local_batch
    batch = {"x": rng.normal(size=(n, 5)).astype(np.float32),
             "y": rng.normal(size=(n, 3)).astype(np.float32),
             federated.MASK: np.repeat(np.array([1.0] * (slots - 1) + [0.0], np.float32),
                                       local_steps * local_batch),
             federated.WEIGHT: np.repeat(np.arange(1, slots + 1, dtype=np.float32),
                                         local_steps * local_batch)}
    return params, batch


def hand_written_local_training(params, rows, local_steps, lr):
    """SGD on one client's local batches, one after the other."""
    p = params
    for batch in rows:
        grads = jax.grad(lambda q, b=batch: regression_loss(q, b, None)[0])(p)
        p = jax.tree.map(lambda a, g: a - lr * g, p, grads)
    return jax.tree.map(jnp.subtract, p, params)


def client_rows(batch, slot, local_steps, local_batch):
    per = local_steps * local_batch
    return [{k: batch[k][slot * per + i * local_batch:slot * per + (i + 1) * local_batch]
             for k in ("x", "y")} for i in range(local_steps)]


@pytest.mark.parametrize("server", ["fedavg", "fedadam"])
def test_a_round_is_fedavg_of_hand_written_local_sgd(server):
    """The round step: every client's local SGD as a loop would do it, the updates averaged
    with the clients' weights (a padding slot's left out), applied by the server optimizer."""
    import optax

    from genai_jax.optim.federated import server_optimizer

    params, batch = regression_round()
    fed = FedAvg(local_steps=2, local_batch=4, client_lr=0.3, expected_clients=2)
    fed_cfg = ml_collections.ConfigDict(dict(server_optimizer=server, server_lr=0.5))
    tx = server_optimizer(fed_cfg)
    state = TrainState.create(params, tx, jax.random.PRNGKey(0))
    new, metrics = jax.jit(make_round_step(regression_loss, tx, fed))(state, batch)
    updates = [hand_written_local_training(params, client_rows(batch, c, 2, 4), 2, 0.3)
               for c in range(2)]
    average = jax.tree.map(lambda a, b: (1 * a + 2 * b) / 3, *updates)
    step, _ = tx.update(jax.tree.map(jnp.negative, average), tx.init(params), params)
    expected = optax.apply_updates(params, step)
    for k in params:
        np.testing.assert_allclose(new.params[k], expected[k], rtol=2e-5, atol=1e-6)
    assert float(metrics["clients"]) == 2 and int(new.step) == 1
    np.testing.assert_allclose(metrics["update_norm"], optax.global_norm(average), rtol=1e-5)


def hand_written_local_adam(params, rows, lr, mu, nu, count, b1=0.9, b2=0.99, eps=1e-8):
    """Adam from moments `mu`, `nu` after `count` steps on one client's local batches."""
    p = params
    for batch in rows:
        grads = jax.grad(lambda q, b=batch: regression_loss(q, b, None)[0])(p)
        count += 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, nu, grads)
        m_hat, v_hat = 1 - b1 ** count, 1 - b2 ** count
        p = jax.tree.map(lambda a, m, v, m_hat=m_hat, v_hat=v_hat:
                         a - lr * (m / m_hat) / (jnp.sqrt(v / v_hat) + eps), p, mu, nu)
    return jax.tree.map(jnp.subtract, p, params), mu, nu


def test_averaged_client_moments_carry_the_round_clients_mean_adam_moments():
    """client_moments='averaged': every client's local Adam starts from the server's moments,
    and the server keeps the clients' final moments averaged with the updates' weights."""
    from genai_jax.optim.federated import FedOptState, server_optimizer

    params, batch = regression_round()
    fed = FedAvg(local_steps=2, local_batch=4, client_lr=0.05, expected_clients=2,
                 client_optimizer="adam", averaged_moments=True)
    fed_cfg = ml_collections.ConfigDict(dict(server_optimizer="fedavg", server_lr=1.0,
                                             client_moments="averaged"))
    tx = server_optimizer(fed_cfg)
    state = TrainState.create(params, tx, jax.random.PRNGKey(0))
    assert isinstance(state.opt_state, FedOptState)
    step = jax.jit(make_round_step(regression_loss, tx, fed))
    p = params
    mu = nu = jax.tree.map(jnp.zeros_like, params)
    for round_ in range(2):
        state, _ = step(state, batch)
        outs = [hand_written_local_adam(p, client_rows(batch, c, 2, 4), 0.05, mu, nu,
                                        2 * round_) for c in range(2)]
        mean = lambda trees: jax.tree.map(lambda a, b: (1 * a + 2 * b) / 3, *trees)
        p = jax.tree.map(jnp.add, p, mean([o[0] for o in outs]))
        mu, nu = mean([o[1] for o in outs]), mean([o[2] for o in outs])
        moments = state.opt_state.client
        assert int(moments.count) == 2 * (round_ + 1)
        for k in params:
            np.testing.assert_allclose(state.params[k], p[k], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(moments.mu[k], mu[k], rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(moments.nu[k], nu[k], rtol=1e-4, atol=1e-9)


def test_a_clients_data_never_enters_another_clients_update():
    params, batch = regression_round(slots=4)
    fed = FedAvg(local_steps=2, local_batch=4, client_lr=0.3, expected_clients=3)
    rows = {k: batch[k] for k in ("x", "y")}
    grad_fn = jax.value_and_grad(regression_loss, has_aux=True)
    updates = jax.jit(lambda r: client_updates(grad_fn, params, r, jax.random.PRNGKey(0),
                                               fed)[0])
    base = updates(rows)
    changed = {k: v.copy() for k, v in rows.items()}
    changed["x"][8:16] += 1.0  # every row of client (slot) 1
    moved = updates(changed)
    for slot in range(4):
        same = all(np.array_equal(a[slot], b[slot])
                   for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(moved), strict=True))
        assert same == (slot != 1), slot


def test_dp_fedavg_clips_client_updates_and_adds_the_stated_noise():
    params, batch = regression_round()
    clip = 0.05
    quiet = FedAvg(2, 4, client_lr=0.3, expected_clients=2, clip_norm=clip)
    import optax

    tx = optax.sgd(1.0)
    state = TrainState.create(params, tx, jax.random.PRNGKey(0))
    new, metrics = jax.jit(make_round_step(regression_loss, tx, quiet))(state, batch)
    updates = [hand_written_local_training(params, client_rows(batch, c, 2, 4), 2, 0.3)
               for c in range(2)]
    scales = [min(1.0, clip / float(optax.global_norm(u))) for u in updates]
    clipped = [jax.tree.map(lambda x, s=s: x * s, u) for u, s in zip(updates, scales, strict=True)]
    expected = jax.tree.map(lambda p, a, b: p + (a + b) / 2, params, *clipped)  # equal weights
    for k in params:
        np.testing.assert_allclose(new.params[k], expected[k], rtol=1e-4, atol=1e-7)
    assert float(metrics["clipped_fraction"]) == 1.0
    # the noise: std noise_multiplier x clip_norm on the sum, / the expected clients
    loud = FedAvg(2, 4, client_lr=0.3, expected_clients=2, clip_norm=clip, noise_multiplier=3.0)
    noisy, _ = jax.jit(make_round_step(regression_loss, tx, loud))(state, batch)
    diff = np.concatenate([np.ravel(noisy.params[k] - new.params[k]) for k in params])
    assert diff.std() == pytest.approx(3.0 * clip / 2, rel=0.25)  # 56 draws


def test_dp_fedavg_accounts_rounds_and_client_sampling():
    c = tiny_lm_config(**{"train.steps": 100, "train.privacy.noise_multiplier": 1.0,
                          "train.federated.clients_per_round": 5})
    plan = accounting.plan(c.train, 200, clients_per_round=5)
    assert plan.sampling_rate == 5 / 200 and plan.mechanism == "DP-FedAvg"
    assert plan.epsilon() == accounting.epsilon(5 / 200, 1.0, 100, c.train.privacy.delta)
    assert "100 rounds of DP-FedAvg" in plan.describe()


def fed_lm_config(play_file, **overrides):
    return tiny_lm_config(**{
        "data.path": str(play_file), "train.steps": 4, "train.batch_size": 2,
        "train.log_every": 2, "eval.every": 4, "checkpoint.every": 2,
        "train.federated.clients_per_round": 3, "train.federated.partition": "by_speaker",
        "train.federated.local_steps": 2, "train.federated.client_lr": 0.5,
        "train.federated.server_optimizer": "fedadam", "train.federated.server_lr": 0.01,
        **overrides})


# User-level DP-FedAvg: Poisson-sampled clients (3 of 6 expected per round), clipped, noised.
DP_FED = {"train.privacy.noise_multiplier": 1.0, "train.privacy.clip_norm": 0.05,
          "train.privacy.delta": 1e-2}


def test_a_dp_fedavg_run_resumes_exactly_per_round_and_logs_epsilon(play_file, tmp_path):
    straight = train(fed_lm_config(play_file, **DP_FED), tmp_path / "straight", progress=False)
    info = straight.pipeline.info["federated"]
    assert len(info["client_sizes"]) == len(SPEAKERS)
    train(fed_lm_config(play_file, **DP_FED), tmp_path / "resumed", progress=False,
          stop_at_step=2)
    resumed = train(fed_lm_config(play_file, **DP_FED), tmp_path / "resumed", progress=False)
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    metrics = [m for m in read_metrics(tmp_path / "straight") if "train/loss" in m]
    assert [m["step"] for m in metrics] == [2, 4]
    (again,) = [m for m in read_metrics(tmp_path / "resumed") if m["step"] == 4]
    assert (again["eval/loss"], again["eval/accuracy"]) == (metrics[-1]["eval/loss"],
                                                            metrics[-1]["eval/accuracy"])
    assert metrics[-1]["privacy/epsilon"] == pytest.approx(straight.privacy.epsilon(), rel=1e-9)
    assert straight.privacy.units == 6 and straight.privacy.sampling_rate == 0.5
    saved = json.loads((tmp_path / "straight" / "privacy.json").read_text())
    assert saved["mechanism"] == "DP-FedAvg" and saved["batch_cap"] == info["slots"] == 6
    # the rows of a round: its client slots x 2 local steps x 2 local batch
    assert straight.pipeline.train.batch_size == info["slots"] * 4
    other = ml_collections.ConfigDict(fed_lm_config(play_file, **DP_FED).to_dict())
    other.train.federated.local_steps = 3
    with pytest.raises(UserError, match="train.federated.local_steps: 2 -> 3"):
        prepare(other, tmp_path / "straight")


def test_averaged_moments_and_by_size_sampling_resume_exactly_per_round(play_file, tmp_path):
    """The server's copy of the clients' Adam moments is checkpointed with the round."""
    from genai_jax.optim.federated import FedOptState

    overrides = {"train.federated.client_optimizer": "adam", "train.federated.client_lr": 0.01,
                 "train.federated.client_moments": "averaged",
                 "train.federated.client_sampling": "by_size"}
    straight = train(fed_lm_config(play_file, **overrides), tmp_path / "straight",
                     progress=False)
    train(fed_lm_config(play_file, **overrides), tmp_path / "resumed", progress=False,
          stop_at_step=2)
    resumed = train(fed_lm_config(play_file, **overrides), tmp_path / "resumed", progress=False)
    assert isinstance(resumed.state.opt_state, FedOptState)
    assert int(resumed.state.opt_state.client.count) == 4 * 2  # rounds x local steps
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_label_skewed_image_run_trains_its_clients(tmp_path):
    from genai_jax.config import base_config

    c = base_config("vae")
    c.model.update(latent_dim=4, channels=8, stages=1, blocks=1, hidden=16)
    c.data = image_data_config("digits")
    c.train.update(steps=2, batch_size=2, log_every=2, warmup_steps=0)
    c.eval.update(every=2, steps=1, num_samples=0, iw_samples=4, iw_chunk=2)
    c.checkpoint.update(every=2)
    c.train.federated.update(clients_per_round=2, num_clients=20, partition="label_skew",
                             dirichlet_alpha=0.3, local_steps=2)
    run = train(overridden(c, {}), tmp_path, progress=False)
    (last,) = [m for m in read_metrics(tmp_path) if "train/loss" in m]
    assert last["train/clients"] == 2 and np.isfinite(last["eval/nll_nats"])
    assert run.pipeline.info["federated"]["num_clients"] == 20


@pytest.mark.parametrize("overrides, message", [
    ({"train.federated.partition": "iid", "train.federated.num_clients": 5000},
     "some client would be empty"),
    ({"train.federated.clients_per_round": 9}, "exceeds the 6 clients"),
    ({"train.federated.partition": "label_skew", "train.federated.num_clients": 5},
     "partitions image data"),
    ({"train.federated.partition": "iid"}, "set num_clients"),
    ({"train.grad_accum_steps": 2}, "train.grad_accum_steps must be 1"),
    ({"train.federated.server_optimizer": "fedprox"}, "is not one of"),
    ({"data.canaries": 2}, "not federated runs"),
    ({"train.federated.client_sampling": "by_size", "train.privacy.noise_multiplier": 1.0},
     "DP-FedAvg samples clients uniformly"),
    ({"train.federated.client_moments": "averaged"}, "client_optimizer='adam'"),
])
def test_bad_federated_settings_are_one_line_before_compiling(overrides, message, play_file,
                                                             tmp_path):
    with pytest.raises(UserError, match=message):
        prepare(fed_lm_config(play_file, **overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_gan_and_an_empty_label_skew_client_are_refused(tmp_path):
    from genai_jax.config import base_config

    gan = base_config("gan")
    gan.train.federated.update(clients_per_round=2, num_clients=4)
    with pytest.raises(UserError, match="not the GAN"):
        prepare(overridden(gan, {}), tmp_path / "gan")
    vae = base_config("vae")
    vae.data = image_data_config("digits")
    vae.train.federated.update(clients_per_round=2, num_clients=400, partition="label_skew",
                               dirichlet_alpha=0.01)
    with pytest.raises(UserError, match="without examples"):
        prepare(overridden(vae, {}), tmp_path / "vae")
    assert not (tmp_path / "vae").exists()
