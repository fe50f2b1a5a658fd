"""The command line, end to end: train -> sample -> evaluate -> benchmark, preemption, and every
researcher mistake reported as one line with a non-zero exit and an untouched workdir."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT

CHAR = "experiments/configs/lm_char.py"
TINY = ["--config.model.num_layers=1", "--config.model.embed_dim=32", "--config.model.num_heads=2",
        "--config.model.block_size=16", "--config.train.batch_size=4",
        "--config.train.warmup_steps=2", "--config.train.log_every=5", "--config.eval.steps=2",
        "--config.eval.every=10", "--config.checkpoint.every=10", "--config.train.steps_per_call=1"]


def cli(module: str, *args: str, env, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


def tree_digest(path) -> str:
    h = hashlib.sha1()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def trained_workdir(text_file, env, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cli_run")
    proc = cli("train", f"--config={CHAR}", f"--workdir={workdir}", *TINY,
               f"--config.data.path={text_file}", "--config.train.steps=20",
               "--config.sample.max_new_tokens=20", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sample at step 20" in proc.stdout
    return workdir


def test_train_writes_the_workdir(trained_workdir):
    lines = (trained_workdir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 20
    assert (trained_workdir / "checkpoints" / "20").is_dir()
    assert list((trained_workdir / "samples").glob("step_00000020.txt"))


def test_rerunning_a_finished_run_resumes_and_does_nothing(trained_workdir, text_file, env):
    before = (trained_workdir / "metrics.jsonl").read_text()
    proc = cli("train", f"--config={CHAR}", f"--workdir={trained_workdir}", *TINY,
               f"--config.data.path={text_file}", "--config.train.steps=20", "--nosample", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (trained_workdir / "metrics.jsonl").read_text() == before


def test_sample_batched_prompts(trained_workdir, env):
    proc = cli("sample", f"--workdir={trained_workdir}", "--prompt=The quick",
               "--prompt=A", "--max_new_tokens=12", "--temperature=0.7", "--top_k=5",
               "--top_p=0.9", "--seed=1", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    texts = proc.stdout.split("-" * 40)
    assert len(texts) == 2 and texts[0].strip().startswith("The quick")
    assert len(texts[0].strip()) == len("The quick") + 12


def test_evaluate_reports_loss_perplexity_bits_per_byte(trained_workdir, env):
    proc = cli("evaluate", f"--workdir={trained_workdir}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["step"] == 20
    assert result["perplexity"] == pytest.approx(2.718281828 ** result["loss"], rel=1e-5)
    # the char tokenizer on an ASCII corpus: one byte per token
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / np.log(2), rel=1e-5)


def test_benchmark_prints_one_json_line(text_file, env):
    proc = cli("benchmark", f"--config={CHAR}", *TINY, f"--config.data.path={text_file}",
               "--steps=3", "--rounds=2", "--decode_tokens=8", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    for key in ("first_step_compile_s", "decode_tokens_per_s", "peak_note"):
        assert key in result
    per_s, rounds = result["train_tokens_per_s"], result["train_tokens_per_s_rounds"]
    spread = result["train_tokens_per_s_spread"]
    assert len(rounds) == 2 and per_s == spread["median"] == pytest.approx(np.median(rounds))
    assert (spread["min"], spread["max"]) == (min(rounds), max(rounds))
    assert "over 2 rounds: median" in lines[-2]
    assert result["step_ms"] == pytest.approx(1000 * 4 * 16 / per_s)  # batch 4 x 16 tokens
    flops_per_s = result["model_flops_per_token"] * per_s
    assert result["mfu"] == pytest.approx(flops_per_s / result["peak_flops"])
    assert result["mfu_vs_timed_matmul"] == pytest.approx(flops_per_s
                                                          / result["timed_matmul_flops"])
    assert result["peak_source"].startswith("derived: ") and "GHz" in result["peak_source"]
    assert 0 < result["mfu"] < 1
    origin = result["provenance"]
    assert origin["cpu_model"] and origin["versions"]["jaxlib"] and origin["backend"] == "cpu"


def test_sigterm_checkpoints_and_exits_cleanly(text_file, env, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.train", f"--config={CHAR}", f"--workdir={tmp_path}",
         *TINY, f"--config.data.path={text_file}", "--config.train.steps=100000",
         "--config.checkpoint.every=100000", "--nosample"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "SIGTERM: saved a checkpoint" in stderr
    steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir()]
    assert len(steps) == 1 and steps[0] >= 5


@pytest.mark.parametrize("args,message", [
    (["--config.train.stepz=3"], "unknown config key 'stepz'; Did you mean \"steps\""),
    (["--config.train.steps=abc"], "--config.train.steps=abc: invalid literal"),
    (["--config.model.num_heads=3"], "model.num_heads=3 must divide model.embed_dim=32"),
    (["--config.data.path=/no/such/file.txt"], "data.path '/no/such/file.txt' does not exist"),
    (["--config.data.name=no_such_dataset_xyz", "--config.data.path="],
     "data.name='no_such_dataset_xyz' is neither"),
    (["--config.mesh.data=3"], "mesh data=3 x fsdp=1 x tensor=1 has 3 devices but there are 1"),
    (["--config.data.tokenizer=bpe:100"], "data.tokenizer='bpe:100' is not one of 'byte', 'char'"),
    (["--config.data.tokenizer=hf:/no/such/dir"], "/no/such/dir has no tokenizer.json"),
])
def test_bad_config_is_one_line(args, message, text_file, env, tmp_path):
    proc = cli("train", f"--config={CHAR}", f"--workdir={tmp_path}", *TINY,
               f"--config.data.path={text_file}", *args, env=env)
    assert message in error_line(proc)
    assert not list(tmp_path.iterdir())  # nothing written


def test_bad_data_files_are_one_line(env, tmp_path):
    empty, binary = tmp_path / "empty.txt", tmp_path / "binary.txt"
    empty.write_text("")
    binary.write_bytes(b"caf\xe9 latin-1, not UTF-8 \xff" * 20)
    for path, message in ((empty, "is empty"), (binary, "is not UTF-8 text")):
        workdir = tmp_path / path.stem
        proc = cli("train", f"--config={CHAR}", f"--workdir={workdir}", *TINY,
                   f"--config.data.path={path}", env=env)
        assert message in error_line(proc)
        assert not workdir.exists()


def test_prompt_outside_the_vocabulary_is_one_line(trained_workdir, env):
    proc = cli("sample", f"--workdir={trained_workdir}", "--prompt=Ω≈ç", env=env)
    assert "the prompt has the character 'Ω'" in error_line(proc)


def test_workdir_of_another_model_is_refused_untouched(trained_workdir, text_file, env):
    before = tree_digest(trained_workdir)
    proc = cli("train", f"--config={CHAR}", f"--workdir={trained_workdir}", *TINY,
               f"--config.data.path={text_file}", "--config.model.embed_dim=64", env=env)
    assert "another model/data config (model.embed_dim: 32 -> 64)" in error_line(proc)
    assert tree_digest(trained_workdir) == before


def test_missing_config_file_and_workdir(env, tmp_path):
    proc = cli("train", "--config=experiments/configs/nope.py", f"--workdir={tmp_path}", env=env)
    assert "config file experiments/configs/nope.py does not exist" in error_line(proc)
    proc = cli("sample", f"--workdir={tmp_path}", env=env)
    assert "has no config.json" in error_line(proc)
