"""Data-parallel training of a real config on simulated CPU devices runs to the end.

The trainer used to dispatch one jitted evaluation per batch without waiting; on XLA:CPU several
executions with cross-device all-reduces in flight at once can take every thread of the runtime's
pool into different rendezvous, and the run aborted in `rendezvous.cc` ("Expected 8 threads to
join the rendezvous, but only 7 of them arrived on time") after its first 10 steps, on some
machines every time. Whether it hangs depends on thread timing, so the test runs the exact
command that hung, with lm_char's full-size model, under a timeout: a hang or an abort fails it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from genai_jax.train.metrics import read_metrics
from tests.conftest import ROOT, SHARED_DATA


@pytest.mark.parametrize("devices", [8, 2])
def test_lm_char_data_parallel_runs_to_completion(devices, tmp_path, env):
    workdir = tmp_path / f"dp{devices}"
    command = [sys.executable, "-m", "experiments.train",
               "--config=experiments/configs/lm_char.py",
               f"--config.data.path={SHARED_DATA / 'tinyshakespeare.txt'}",
               "--config.train.steps=20", "--config.train.batch_size=16",
               "--config.eval.every=1000", f"--config.mesh.data={devices}",
               "--config.mesh.fsdp=1", "--config.mesh.tensor=1", f"--workdir={workdir}"]
    run_env = {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    try:
        done = subprocess.run(command, cwd=ROOT, env=run_env, capture_output=True, text=True,
                              timeout=480)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the {devices}-device run hung: {(e.stderr or b'')[-2000:]!r}")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_metrics(workdir)
    last = metrics[-1]
    assert last["step"] == 20
    # One evaluation, at the end, over every eval batch (eval.every > steps).
    assert [m["step"] for m in metrics if "eval/loss" in m] == [20]
    assert 2.0 < last["eval/loss"] < last["train/loss"] + 0.5
    assert os.path.isdir(workdir / "checkpoints" / "20")
