"""The serving benchmark end to end on a tiny trained LM: it starts the real server, counts every
generated token, measures positive latencies, refuses what the load test breaks on purpose with
4xx and stops the server cleanly; a server that cannot start is reported with its own words."""

from __future__ import annotations

import json

import pytest

from tests.test_cli import CHAR, TINY, cli, error_line


@pytest.fixture(scope="module")
def tiny_run(text_file, env, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("serve_bench_run")
    proc = cli("train", f"--config={CHAR}", f"--workdir={workdir}", *TINY,
               f"--config.data.path={text_file}", "--config.train.steps=10",
               "--config.sample.max_new_tokens=4", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def last_json(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_throughput_counts_every_token(tiny_run, env):
    out = last_json(cli("serve_bench", f"--workdir={tiny_run}", "--clients=4",
                        "--prompt_tokens=4", "--max_tokens=8", "--rounds=2", env=env))
    assert out["server_exit_code"] == 0
    assert (out["clients"], out["requests_per_round"], out["rounds"]) == (4, 4, 2)
    assert out["requests"] == 4 * 2
    assert out["generated_tokens"] == 4 * 2 * 8  # ignore_eos: every request runs to max_tokens
    for key in ("tokens_per_s", "requests_per_s", "single_client_tokens_per_s",
                "batching_speedup"):
        assert out[key] > 0, key
    assert 0 < out["ttft_p50_s"] <= out["latency_p50_s"] <= out["latency_p99_s"]
    assert out["ttft_p50_s"] <= out["ttft_p99_s"]
    assert out["cpu"] and out["jax"]


def test_load_mode_answers_the_good_and_refuses_the_bad(tiny_run, env):
    out = last_json(cli("serve_bench", f"--workdir={tiny_run}", "--clients=4",
                        "--prompt_tokens=4", "--max_tokens=8", "--load_requests=40",
                        "--malformed_fraction=0.25", env=env))
    assert (out["well_formed"], out["malformed"]) == (30, 10)
    assert out["well_formed_answered"] == 30, out["unanswered_examples"]
    assert out["malformed_refused_4xx"] == 10, out["malformed_not_refused_examples"]
    assert out["server_errors_5xx"] == out["connection_errors"] == 0
    assert out["rss_after_warmup_bytes"] > 0 and out["rss_after_run_bytes"] > 0
    assert out["server_exit_code"] == 0


def test_a_server_that_cannot_start_is_one_line_with_its_output(tiny_run, env):
    proc = cli("serve_bench", f"--workdir={tiny_run}", "--server_flag=--no_such_server_flag",
               env=env, timeout=120)
    line = error_line(proc)
    assert "exited with status" in line and "before it was ready" in line
    assert "no_such_server_flag" in proc.stderr  # the server's own complaint follows


def test_missing_workdir_and_lonely_peer_flag(tiny_run, env, tmp_path):
    assert "--workdir" in error_line(cli("serve_bench", env=env))
    line = error_line(cli("serve_bench", f"--workdir={tiny_run}", "--peer=x.py", env=env))
    assert "--hf_dir" in line
