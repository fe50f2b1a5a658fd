"""The generic trainer on the LM family: learning, resuming, accumulation, EMA, divergence."""

from __future__ import annotations

import copy
import json
import time

import jax
import numpy as np
import pytest

from genai_jax.errors import UserError
from genai_jax.train import TrainingDiverged, prepare, read_metrics, train
from tests.conftest import overridden, tiny_lm_config


@pytest.fixture(scope="module")
def trained(text_file, tmp_path_factory):
    """One 20-step run, shared by the tests that only read its results."""
    workdir = tmp_path_factory.mktemp("trained")
    config = tiny_lm_config(**{"data.path": str(text_file)})
    return train(config, workdir, progress=False), config, workdir


def test_loss_goes_down_and_workdir_is_complete(trained):
    run, _, workdir = trained
    metrics = read_metrics(workdir)
    train_losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    eval_losses = [m["eval/loss"] for m in metrics if "eval/loss" in m]
    assert train_losses[-1] < train_losses[0] - 0.25, train_losses
    uniform = np.log(run.pipeline.info["tokenizer"].vocab_size)
    assert len(eval_losses) == 2 and eval_losses[-1] < uniform - 0.25
    assert {"eval/perplexity", "eval/bits_per_byte", "train/tokens_per_s",
            "train/learning_rate", "train/grad_norm"} <= set(metrics[-1]) | set(metrics[-2])
    assert json.loads((workdir / "config.json").read_text())["model"]["num_layers"] == 2
    assert (workdir / "genai_tokenizer.json").exists()  # char: genai_jax's own format
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "20"]
    # where the figures came from, one line per start
    (origin,) = [json.loads(line) for line in (workdir / "provenance.jsonl").read_text()
                 .splitlines()]
    assert origin["start_step"] == 0 and origin["versions"]["jax"] == jax.__version__
    assert origin["device_kind"] == jax.devices()[0].device_kind and origin["cpu_model"]
    assert len(origin["commit"]) == 40 and "xla_flags" in origin
    # the throughput window counts training steps alone; evaluations report their own time
    evals = [m for m in metrics if "eval/loss" in m]
    assert all(m["eval/time_s"] > 0 for m in evals)


def test_throughput_excludes_evaluation_time(text_file, tmp_path, monkeypatch):
    """An evaluation made to take 2 s must not lower the next window's throughput."""
    from genai_jax.train import trainer

    config = tiny_lm_config(**{"data.path": str(text_file), "train.log_every": 5,
                               "eval.every": 5, "train.steps": 15, "checkpoint.every": 15})
    evaluate = trainer.Run.evaluate

    def slow_evaluate(self, *args, **kwargs):
        time.sleep(2.0)
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(trainer.Run, "evaluate", slow_evaluate)
    train(config, tmp_path, progress=False)
    records = [m for m in read_metrics(tmp_path) if "train/tokens_per_s" in m]
    assert [m["step"] for m in records] == [5, 10, 15]
    # 5 steps of 64 tokens take far less than 2 s here: counting the sleep would cap the rate
    # at 5 * 64 / 2 = 160 tokens/s
    assert all(m["train/tokens_per_s"] > 1000 for m in records[1:]), records
    assert all(m["eval/time_s"] >= 2.0 for m in records)


def test_resumed_run_equals_uninterrupted_run(trained, tmp_path):
    uninterrupted, config, workdir = trained
    first = train(config, tmp_path, progress=False, stop_at_step=12)  # "preempted" at step 12
    assert first.start_step == 12 and (tmp_path / "checkpoints" / "12").exists()
    resumed = train(config, tmp_path, progress=False)  # the same call again resumes at 12
    assert resumed.start_step == 20
    full = {m["step"]: m for m in read_metrics(workdir)}
    parts = {m["step"]: m for m in read_metrics(tmp_path)}
    # step 20 logs the mean over steps 16-20 in both runs
    assert parts[20]["train/loss"] == pytest.approx(full[20]["train/loss"], rel=1e-6)
    assert parts[20]["eval/loss"] == pytest.approx(full[20]["eval/loss"], rel=1e-6)
    pairs = zip(jax.tree.leaves(resumed.state.params),
                jax.tree.leaves(uninterrupted.state.params), strict=True)
    for a, b in pairs:
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_resume_with_data_workers_equals_uninterrupted_run(trained, tmp_path):
    """The batches of a step are the same whether worker processes read them or not, and
    however many: part of a run read by one worker and the rest by two ends where a run read
    in the training process does."""
    uninterrupted, config, _ = trained
    with_workers = lambda n: overridden(copy.deepcopy(config).unlock(), {"data.workers": n})
    train(with_workers(1), tmp_path, progress=False, stop_at_step=12)
    resumed = train(with_workers(2), tmp_path, progress=False)
    waits = [m["train/data_wait_ms"] for m in read_metrics(tmp_path) if "train/loss" in m]
    assert waits and all(w >= 0 for w in waits)
    pairs = zip(jax.tree.leaves(resumed.state.params),
                jax.tree.leaves(uninterrupted.state.params), strict=True)
    for a, b in pairs:
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_gradient_accumulation_matches_one_big_batch(text_file, tmp_path):
    base = {"data.path": str(text_file), "train.steps": 3, "train.batch_size": 8}
    runs = []
    for i, accum in enumerate((1, 4)):
        config = tiny_lm_config(**base, **{"train.grad_accum_steps": accum})
        runs.append(train(config, tmp_path / str(i), progress=False))
    a, b = (jax.tree_util.tree_leaves_with_path(r.state.params) for r in runs)
    for (path, x), (_, y) in zip(a, b, strict=True):
        if "['k']['bias']" in jax.tree_util.keystr(path):
            # The attention key bias adds q.b to every logit of a row, which the softmax
            # cancels: its true gradient is 0, its computed one float32 rounding (~1e-9), and
            # Adam's first steps scale that noise up to ~1e-6 in either run.
            continue
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6)


def test_ema_tracks_the_parameters(text_file, tmp_path):
    config = tiny_lm_config(**{"data.path": str(text_file), "train.steps": 5,
                               "train.ema_decay": 0.5})
    run = train(config, tmp_path, progress=False)
    params, ema = jax.tree.leaves(run.state.params), jax.tree.leaves(run.state.ema)
    assert any(not np.allclose(p, e) for p, e in zip(params, ema, strict=True))
    assert max(float(np.abs(p - e).max()) for p, e in zip(params, ema, strict=True)) < 0.1


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(text_file, tmp_path):
    good = tiny_lm_config(**{"data.path": str(text_file), "train.steps": 10})
    train(good, tmp_path, progress=False)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    bad = tiny_lm_config(**{"data.path": str(text_file), "train.steps": 20,
                            "train.learning_rate": 1e30, "train.grad_clip": 1.0,
                            "train.warmup_steps": 0})
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 1\d.*step 10\) .* intact"):
        train(bad, tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_workdir_of_another_model_is_refused_untouched(trained, text_file):
    _, _, workdir = trained
    before = (workdir / "config.json").read_text()
    other = tiny_lm_config(**{"data.path": str(text_file), "model.embed_dim": 64})
    with pytest.raises(UserError, match="another model/data config .*embed_dim: 32 -> 64"):
        prepare(other, workdir)
    assert (workdir / "config.json").read_text() == before


def test_several_steps_per_call_is_the_same_training(trained, text_file, tmp_path):
    uninterrupted, _, workdir = trained
    config = tiny_lm_config(**{"data.path": str(text_file), "train.steps_per_call": 5})
    run = train(config, tmp_path, progress=False)
    ours = {m["step"]: m for m in read_metrics(tmp_path)}
    ref = {m["step"]: m for m in read_metrics(workdir)}
    for step in (5, 10, 15, 20):
        assert ours[step]["train/loss"] == pytest.approx(ref[step]["train/loss"], rel=1e-5)
    for a, b in zip(jax.tree.leaves(run.state.params), jax.tree.leaves(uninterrupted.state.params),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    bad = tiny_lm_config(**{"data.path": str(text_file), "train.steps_per_call": 3})
    with pytest.raises(UserError, match="train.steps=20 must be a multiple of "
                                        "train.steps_per_call=3"):
        prepare(bad, tmp_path / "bad")
