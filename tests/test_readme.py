"""The README is the front door: every command in it runs, and its config reference lists
every config key.

Commands are read from the README's ```bash blocks and from inline code that starts with
`python -m ` or `make `. Each either runs here as written (shrunk: a tiny model, a few steps,
`runs/` moved to a temporary directory, `...` standing for the lm_char flags of the command
before it), or is named in `ELSEWHERE` with the test or CI step that exercises it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, overridden
from tests.test_serving import Served

README = (ROOT / "README.md").read_text()

# What `...` stands for in the README's abbreviated commands (said there too).
ELLIPSIS = ("--config=experiments/configs/lm_char.py "
            "--config.data.path=../shared/data/tinyshakespeare.txt --workdir=runs/x")

# Commands that cannot run here as written, by a fragment that identifies them, and what
# exercises them instead.
ELSEWHERE = {
    "make test": "CI: .ci/run runs it on a fresh clone",
    "make install": "CI: make test runs it first",
    "make test-all": "the whole suite, this test included: run on the dev machine before landing",
    "apt-get install bazel-bootstrap": "a system package; Bazel is not part of CI (see below)",
    "bazel ": "needs Bazel, which CI does not install; `bazel test //...` was run on the dev "
              "machine, and test_build_file.py::"
              "test_build_file_covers_every_module_and_test_file keeps BUILD complete",
    "make bench-finetune": "installs torch, transformers and peft; test_hf_interop.py::"
                           "test_benchmark_alternates_with_the_transformers_peer runs its "
                           "three steps (random_hf_model, import, benchmark with the peer) on a "
                           "tiny Llama",
    "make bench-serve": "installs torch and transformers and trains two models; "
                        "test_serve_bench.py::test_load_mode_answers_the_good_and_refuses_the_bad "
                        "runs serve_bench's load mode on a tiny run (the test before it, the "
                        "throughput mode)",
    "make bench": "installs torch; test_cli.py::test_benchmark_prints_one_json_line runs the "
                  "benchmark it calls (without the PyTorch peer)",
    "--num_processes=4": "needs 4 hosts; test_parallel.py::"
                         "test_two_processes_train_like_one_process_of_four_devices starts 2 "
                         "processes with these flags on loopback (with the default mesh)",
    "--num_processes=2": "a second shell; test_parallel.py::"
                         "test_two_processes_train_like_one_process_of_four_devices",
    "python -m pallas_kernels.benchmark": "its defaults are GPU-sized; tests/pallas/"
                                          "test_benchmark.py::test_benchmark_prints_json_last "
                                          "runs it on small shapes",
    "data/c2000": "a 2 GB corpus (minutes and 6 GB of disk): test_prepare_data.py::"
                  "test_data_bench_measures_the_pipeline_and_its_memory generates a small one "
                  "and measures the pipeline; the Data-at-scale commands before it prepare and "
                  "train on one",
    "data/s2000": "the 2 GB corpus's shards: test_prepare_data.py::"
                  "test_data_bench_measures_the_pipeline_and_its_memory",
    "gcloud compute tpus": "needs a Cloud TPU slice; the command it runs on each worker is "
                           "the multi-host one above",
    "--workdir=runs/dp8": "test_data_parallel_cli.py::"
                          "test_lm_char_data_parallel_runs_to_completion runs it unshrunk",
    "--hf_dir=DIR --workdir=OUT": "placeholders; the demonstration runs import_checkpoint, and "
                                  "test_hf_interop.py::test_import_sample_export_round_trip "
                                  "imports a random Llama",
    "--workdir=W --hf_dir=DIR": "placeholders; the demonstration runs export_checkpoint, and "
                                "test_hf_interop.py::test_import_sample_export_round_trip",
    "--workdir=W [--reference=W2]": "placeholders; the Privacy section's commands audit real "
                                    "runs, and test_privacy.py::"
                                    "test_privacy_audit_reports_membership_canaries_and_epsilon",
}

# Appended to shrink a training run (later flags win): a few steps, one evaluation, one
# checkpoint; batch sizes and meshes stay as the README wrote them.
SHORT = ["--config.train.steps=4", "--config.train.steps_per_call=1", "--config.train.log_every=2",
         "--config.train.warmup_steps=1", "--config.eval.every=4", "--config.eval.steps=1",
         "--config.checkpoint.every=4"]
NO_SAMPLE_METRICS = ["--config.eval.num_samples=0", "--config.sample.num_samples=10"]
TINY_MODEL = {
    # a 64-token context, as lm_char.py's: the Serving section's requests fit it
    "transformer": ["--config.model.num_layers=1", "--config.model.embed_dim=32",
                    "--config.model.num_heads=2", "--config.model.block_size=64"],
    "diffusion": ["--config.model.channels=8", "--config.model.channel_mult=(1,2)",
                  "--config.model.num_res_blocks=1", "--config.model.num_heads=1",
                  "--config.sample.steps=2", *NO_SAMPLE_METRICS],
    "vae": ["--config.model.channels=8", "--config.model.hidden=32",
            "--config.eval.iw_samples=4", "--config.eval.iw_chunk=4", *NO_SAMPLE_METRICS],
    "gan": ["--config.model.g_channels=8", "--config.model.d_channels=8",
            *NO_SAMPLE_METRICS],
}


def readme_commands(text: str = README) -> list[str]:
    """Every shell command of the README, in order, continuation lines joined and comments
    dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s{2,})#.*$", "", line).strip()
            if line:
                commands.append(" ".join(line.split()))
    for span in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        if span.startswith(("python -m ", "make ")):
            commands.append(" ".join(span.split()))
    return commands


def elsewhere(command: str) -> str | None:
    """Why `command` does not run here, if ELSEWHERE names it (fragments end at a word end)."""
    return next((why for fragment, why in ELSEWHERE.items()
                 if re.search(re.escape(fragment.strip()) + r"(\s|$)", command)), None)


def test_readme_commands_are_all_known():
    for why in ELSEWHERE.values():
        for path, name in re.findall(r"(\w+\.py)::(\w+)", why):
            tests = [p for p in (ROOT / "tests").rglob(path)]
            assert any(f"def {name}(" in p.read_text() for p in tests), why
    commands = readme_commands()
    assert len(commands) >= 10
    for command in commands:
        if elsewhere(command):
            continue
        _, words = env_and_words(command)
        assert words[:3] in (["python", "-m", "experiments.train"],
                             ["python", "-m", "experiments.sample"],
                             ["python", "-m", "experiments.evaluate"],
                             ["python", "-m", "experiments.benchmark"],
                             ["python", "-m", "experiments.import_checkpoint"],
                             ["python", "-m", "experiments.export_checkpoint"],
                             ["python", "-m", "experiments.export_compiled"],
                             ["python", "-m", "experiments.serve"],
                             ["python", "-m", "experiments.serve_bench"],
                             ["python", "-m", "experiments.prepare_data"],
                             ["python", "-m", "experiments.data_bench"],
                             ["python", "-m", "experiments.privacy_audit"]) or words[0] == "curl" \
            or words == ["make", "train"], \
            f"README command neither runnable here nor in ELSEWHERE: {command}"


def test_the_extractor_sees_blocks_continuations_and_inline_commands():
    text = ("```bash\nmake train   # trains\npython -m experiments.sample \\\n    --workdir=w"
            "\n# a comment\n```\nRun `python -m experiments.evaluate --workdir=w` or `pip x`.")
    assert readme_commands(text) == ["make train", "python -m experiments.sample --workdir=w",
                                     "python -m experiments.evaluate --workdir=w"]


def env_and_words(command: str) -> tuple[dict, list[str]]:
    """A README command's leading `VAR=value` assignments, and the words after them."""
    words = shlex.split(command)
    env = {}
    while words and re.match(r"^[A-Z_]+=", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env, words


def shrunk(command: str, runs) -> tuple[dict, list[str]]:
    """(environment additions, argv) of a README command, shrunk to run in seconds: `...`
    expanded first, since the flags it stands for carry a `runs/` workdir too."""
    env, words = env_and_words(command.replace("...", ELLIPSIS).replace("runs/", f"{runs}/"))
    if words[:2] == ["make", "train"]:
        return env, ["make", "--assume-old=.venv/.installed", "train", f"PY={sys.executable}",
                     f"WORKDIR={runs}/make_train", f"TRAIN_ARGS={' '.join(SHORT)}"]
    if "--config.mesh.fsdp=8" in words and "XLA_FLAGS" not in env:  # 8 GPUs: simulated
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    argv = [sys.executable, *words[1:]]
    program = words[2]
    if program == "experiments.train":
        config = next(w.split("=", 1)[1] for w in words if w.startswith("--config="))
        family = os.path.basename(config).split("_")[0]
        family = family if family in TINY_MODEL else "transformer"  # lm_*, llama_*, finetune_*
        argv += SHORT + TINY_MODEL[family]
    elif program == "experiments.benchmark":
        argv += TINY_MODEL["transformer"] + ["--steps=2", "--rounds=1"]
    elif program == "experiments.serve_bench":
        argv += ["--rounds=1"]
    elif program == "experiments.evaluate" and "--num_samples" in command:
        argv += ["--num_samples=20"]
    return env, argv


@pytest.mark.slow
def test_readme_commands_run(env, tmp_path):
    """Every runnable README command: those of the ```bash blocks in README order (training
    before sampling from it), then the inline ones. A training command starts afresh in its
    workdir, so that a command the README repeats trains again instead of finding its run
    finished."""
    ran, server = [], None
    for command in readme_commands():
        if elsewhere(command) or command in ran:
            continue
        if command.startswith("curl "):  # to the server the README started just before
            argv = shlex.split(command.replace("localhost:8000", f"127.0.0.1:{server.port}"))
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0 and json.loads(proc.stdout)["choices"], proc.stdout
            ran.append(command)
            continue
        extra, argv = shrunk(command, tmp_path / "runs")
        if argv[1:3] == ["-m", "experiments.serve"]:  # serves until stopped: in the background
            server = Served([a for a in argv[3:] if not a.startswith("--port")], env)
            ran.append(command)
            continue
        if "experiments.train" in argv:
            workdir = next(w.split("=", 1)[1] for w in argv if w.startswith("--workdir="))
            shutil.rmtree(workdir, ignore_errors=True)
        start = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, env={**env, **extra}, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"README command failed: {command}\n{proc.stderr[-3000:]}"
        ran.append(command)
        print(f"{time.perf_counter() - start:6.1f} s  {command}")
    assert server is not None and server.stop() == 0
    assert len(ran) >= 8


# --- the config reference ---------------------------------------------------------------------


def config_keys(family: str) -> set[str]:
    from genai_jax.config import base_config

    def flat(d, prefix=""):
        for key, value in d.items():
            if isinstance(value, dict) and key != "rules":
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield prefix + key

    return set(flat(base_config(family).to_dict()))


def test_config_reference_lists_every_key():
    from genai_jax.models import FAMILIES

    section = README.split("## Config reference", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([a-z_]+(?:\.[a-z_0-9]+)*)`", section, re.M))
    keys = set().union(*(config_keys(f) for f in FAMILIES))
    assert keys - listed == set(), "config keys missing from the README's config reference"
    assert listed - keys == set(), "the README's config reference lists keys that do not exist"


# --- the worked example of a new model family ---------------------------------------------------


@pytest.fixture
def pixel_gaussian(tmp_path, monkeypatch):
    """The README's example family, written to a module and registered."""
    section = README.split("### Adding a model family", 1)[1]
    source = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "pixel_gaussian.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    from genai_jax import models

    monkeypatch.setitem(models.FAMILIES, "pixel_gaussian", ("pixel_gaussian", "image"))
    return tmp_path


def test_the_readme_family_trains_without_touching_the_trainer(pixel_gaussian):
    import jax

    from genai_jax.config import ConfigError, base_config, validate
    from genai_jax.train import read_metrics, train

    config = base_config("pixel_gaussian")
    config.lock()  # so that the overrides below may only change keys the family defines
    config = overridden(config, {
        "data.name": "digits", "data.data_dir": str(pixel_gaussian / "tfds"),
        "train.steps": 60, "train.batch_size": 32, "train.learning_rate": 3e-2,
        "train.weight_decay": 0.0, "train.log_every": 20, "train.steps_per_call": 20,
        "eval.every": 60, "eval.steps": 1, "eval.num_samples": 0, "checkpoint.every": 60})
    run = train(config, pixel_gaussian / "run", progress=False)
    losses = [m["train/loss"] for m in read_metrics(pixel_gaussian / "run") if "train/loss" in m]
    assert losses[-1] < losses[0] - 0.5  # the per-pixel Gaussian fits
    x = run.family.sample(run.state, jax.random.PRNGKey(0), num_samples=10)["x"]
    assert x.shape == (10, 8, 8, 1) and -1 <= x.min() <= x.max() <= 1

    config.model.min_log_std = 1.0
    with pytest.raises(ConfigError, match="model.min_log_std=1.0 must be negative"):
        validate(config)
