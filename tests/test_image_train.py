"""The image families through the one trainer and the command line: a real step of each on mock
TFDS data, short digits runs with the sample-based metrics, GAN resume, and bad inputs."""

from __future__ import annotations

import importlib
import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from genai_jax.evaluation.images import SampleEvaluator
from genai_jax.train import read_metrics, train
from tests.conftest import ROOT, overridden
from tests.test_cli import cli, error_line, tree_digest

FAMILIES = ("vae", "gan", "diffusion")
SMALL = {"train.steps": 4, "train.batch_size": 8, "train.steps_per_call": 1,
         "train.log_every": 2, "train.warmup_steps": 1, "eval.every": 4, "eval.steps": 1,
         "eval.batch_size": 8, "eval.num_samples": 40, "checkpoint.every": 2,
         "sample.num_samples": 10}


# The UNet compiles slowest: half its width, one block per level, 8 sampling steps.
SMALL_MODEL = {"diffusion": {"model.channels": 16, "model.num_res_blocks": 1, "sample.steps": 8}}


def family_config(family: str, **overrides):
    """`experiments/configs/{family}_digits.py` shrunk to a few steps, with `overrides`."""
    config = importlib.import_module(f"experiments.configs.{family}_digits").get_config()
    return overridden(config, {**SMALL, **SMALL_MODEL.get(family, {}), **overrides})


@pytest.mark.parametrize("family", FAMILIES)
def test_one_real_step_on_mock_tfds_mnist(family, tmp_path):
    config = family_config(family, **{"data.name": "mnist", "train.steps": 2, "eval.every": 2,
                                      "eval.num_samples": 0, "checkpoint.every": 2})
    with tfds.testing.mock_data(num_examples=16):
        run = train(config, tmp_path, progress=False)
    last = read_metrics(tmp_path)[-1]
    assert last["step"] == 2 and np.isfinite(last["train/loss"])
    assert all(np.isfinite(v) for k, v in last.items() if k.startswith("eval/"))
    # the run returns the trained state, moved from its initial value (not every leaf: the
    # warm-up's first step has learning rate 0, and zero-initialised residual branches keep
    # their first layer's gradient at 0 until the second has moved)
    initial = jax.jit(run.family.init)(jax.random.PRNGKey(config.seed))
    params = lambda s: s.params if hasattr(s, "params") else (s.g_params, s.d_params)  # GAN
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         params(initial), params(run.state))
    assert run.start_step == 2 and any(jax.tree.leaves(moved)), moved


@pytest.fixture(scope="module", params=FAMILIES)
def digits_run(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(f"{request.param}_digits")
    config = family_config(request.param)
    return request.param, train(config, workdir, progress=False), workdir


def test_digits_run_reports_sample_metrics_and_writes_grids(digits_run):
    family, run, workdir = digits_run
    metrics = read_metrics(workdir)
    evals = [m for m in metrics if "eval/fid_classifier" in m]
    assert [m["step"] for m in evals] == [4]
    last = evals[-1]
    # the floor: the first 40 of the images reserved unseen by the classifier, against the
    # held-out features, whatever is scored; 4 training steps are far from it
    evaluator = SampleEvaluator(run.pipeline.info, seed=run.config.seed)
    noise = np.random.default_rng(1).uniform(-1, 1, (40, 8, 8, 1))
    assert last["eval/fid_floor"] == pytest.approx(evaluator(noise)["fid_floor"], rel=1e-6)
    assert last["eval/fid_classifier"] > 1.5 * last["eval/fid_floor"]
    assert 0.9 < last["eval/classifier_heldout_accuracy"] <= 1
    if run.config.model.conditional:  # 40 samples of 4-step models: near chance (0.1)
        assert last["eval/classifier_accuracy"] * 40 == pytest.approx(
            round(last["eval/classifier_accuracy"] * 40))
        assert last["eval/classifier_accuracy"] < 0.5
    if family == "vae":
        # (the IWAE bound is tested against the ELBO in test_vae.py)
        assert last["eval/bits_per_dim"] == pytest.approx(
            last["eval/nll_nats"] / (8 * 8 * np.log(2)), rel=1e-4)
    assert (workdir / "samples" / "step_00000004.png").exists()
    assert "train/examples_per_s" in metrics[-1] or "train/examples_per_s" in metrics[-2]


def test_gan_resume_equals_uninterrupted_run(tmp_path):
    config = family_config("gan", **{"train.steps": 6, "eval.every": 6, "eval.num_samples": 0,
                                     "checkpoint.every": 2})
    full = train(config, tmp_path / "full", progress=False)
    first = train(config, tmp_path / "parts", progress=False, stop_at_step=2)
    assert first.start_step == 2
    resumed = train(config, tmp_path / "parts", progress=False)
    assert resumed.start_step == 6
    pairs = zip(jax.tree.leaves(resumed.state), jax.tree.leaves(full.state), strict=True)
    for a, b in pairs:  # both parameter sets, both optimizer states, EMA, step and key
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _write_pngs(folder, shape, n=200):  # ~20 held out: more than one eval batch
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, shape, np.uint8)).save(folder / f"{i}.png")


def test_bad_image_inputs_are_one_line(tmp_path, env):
    config = f"--config={ROOT}/experiments/configs/vae_digits.py"
    small = [f"--config.{k}={v}" for k, v in SMALL.items()]
    (tmp_path / "empty").mkdir()
    proc = cli("train", config, f"--workdir={tmp_path / 'w1'}", *small,
               "--config.data.name=image_folder", f"--config.data.path={tmp_path / 'empty'}",
               env=env)
    assert "holds no PNG or JPEG images" in error_line(proc)
    assert not (tmp_path / "w1").exists()

    _write_pngs(tmp_path / "flat", (8, 8))
    proc = cli("train", config, f"--workdir={tmp_path / 'w2'}", *small,
               "--config.data.name=image_folder", f"--config.data.path={tmp_path / 'flat'}",
               "--config.model.conditional=True", env=env)
    assert "model.conditional=True needs class labels" in error_line(proc)

    # a workdir trained on 8x8 images refuses a folder of 6x6 ones, before touching anything
    workdir = tmp_path / "w3"
    proc = cli("train", config, f"--workdir={workdir}", *small, "--config.train.steps=2",
               "--config.eval.num_samples=0", "--config.data.name=image_folder",
               f"--config.data.path={tmp_path / 'flat'}", "--config.model.conditional=False",
               "--nosample", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _write_pngs(tmp_path / "small", (6, 6))
    before = tree_digest(workdir)
    proc = cli("train", config, f"--workdir={workdir}", *small, "--config.train.steps=4",
               "--config.data.name=image_folder", f"--config.data.path={tmp_path / 'small'}",
               "--config.model.conditional=False", env=env)
    assert "holds a model of examples" in error_line(proc)
    assert tree_digest(workdir) == before


def test_sample_and_evaluate_cli(digits_run, env):
    family, run, workdir = digits_run
    if family != "vae":
        pytest.skip("one family through the CLI is enough")
    proc = cli("sample", f"--workdir={workdir}", "--num_samples=20", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (workdir / "samples" / "step_00000004.png").exists()
    proc = cli("evaluate", f"--workdir={workdir}", "--num_samples=50",
               "--set=eval.binarize=stochastic", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["heldout_examples"] == 176  # 180 held-out digits in full batches of 8
    assert {"elbo", "nll_nats", "bits_per_dim", "fid_classifier", "fid_floor"} <= set(result)
    proc = cli("evaluate", f"--workdir={workdir}", "--set=train.steps=3", env=env)
    assert "only existing eval.* and sample.* keys can be set" in error_line(proc)
