"""Crash safety: kills at any point, unreadable checkpoints, failed writes, one run per workdir.

Every resumed run here must log exactly the losses of the run that was never interrupted
(batches are a function of the step, dropout keys of the step; the restored state is the saved
one bit for bit), so the comparisons are exact.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import signal
import subprocess
import sys

import pytest

from genai_jax.train import checkpoint, read_metrics, train
from genai_jax.train.lock import LOCK_FILE, WorkdirLock
from tests.conftest import ROOT
from tests.crash_runs import crash_config


def losses(workdir) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, text_file):
    """The uninterrupted run's losses, step by step."""
    workdir = tmp_path_factory.mktemp("reference")
    train(crash_config(str(text_file)), workdir, progress=False)
    out = losses(workdir)
    assert sorted(out) == list(range(1, 21))
    return out


def train_cli(workdir, text_file, env, file_size_kib: int | None = None):
    """`experiments.train` with `crash_config`, as a user would run it (under a file-size
    limit: `ulimit -f`, RLIMIT_FSIZE, as a full disk would stop its writes)."""
    limit = f"ulimit -f {file_size_kib}; " if file_size_kib else ""
    command = (f"{limit}exec "
               f"{shlex.quote(sys.executable)} -m experiments.train "
               f"--config=tests/crash_runs.py:{shlex.quote(str(text_file))} "
               f"--workdir={shlex.quote(str(workdir))}")
    return subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """The run's one `error: ...` line (exit status 2), with no traceback through this
    project's code. Orbax's and TensorStore's background threads may print tracebacks of their
    own after a failed write or read ("Event loop is closed"): upstream noise, not ours."""
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-2000:]
    assert not any(f'File "{ROOT / package}/' in done.stderr
                   for package in ("genai_jax", "experiments")), done.stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize("point", ["before_first_checkpoint", "during_save", "after_save"])
def test_kill_9_then_rerun_logs_the_uninterrupted_losses(point, reference, text_file, tmp_path,
                                                         env):
    workdir = tmp_path / "run"
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "crash_runs.py"),
                             str(text_file), str(workdir), point], env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpt = workdir / "checkpoints"
    steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    assert steps == {"before_first_checkpoint": [], "during_save": [],
                     "after_save": [10]}[point]
    if point == "during_save":  # the half-written step is there, in a temporary directory
        assert any("tmp" in p.name for p in ckpt.iterdir())
    assert (workdir / LOCK_FILE).read_text().startswith("pid ")  # left by the killed run

    run = train(crash_config(str(text_file)), workdir, progress=False)
    assert run.start_step == 20
    assert losses(workdir) == reference
    assert not any("tmp" in p.name for p in ckpt.iterdir())
    assert (workdir / LOCK_FILE).read_text() == ""  # released cleanly this time


@pytest.fixture
def trained(tmp_path, text_file):
    """A finished run with checkpoints at steps 10 and 20."""
    workdir = tmp_path / "run"
    train(crash_config(str(text_file)), workdir, progress=False)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "10", "20"]
    return workdir


def largest_file(directory: pathlib.Path) -> pathlib.Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_unreadable_latest_checkpoint_falls_back_to_the_previous_one(damage, trained, reference,
                                                                     text_file, caplog):
    victim = largest_file(trained / "checkpoints" / "20")
    if damage == "truncate":
        with victim.open("r+b") as f:
            f.truncate(victim.stat().st_size // 2)
    else:
        victim.unlink()
    metrics_before = (trained / "metrics.jsonl").read_text()
    run = train(crash_config(str(text_file)), trained, progress=False)
    assert run.start_step == 20
    fallbacks = [r.getMessage() for r in caplog.records
                 if "cannot be read" in r.getMessage()]
    assert len(fallbacks) == 1 and "step 20" in fallbacks[0] and "step 10" in fallbacks[0]
    assert (trained / checkpoint.UNREADABLE_DIR / "20").is_dir()
    # Steps 11..20 were trained again and logged again: the last record of each counts.
    text = (trained / "metrics.jsonl").read_text()
    assert text.startswith(metrics_before) and len(text) > len(metrics_before)
    assert losses(trained) == reference


def test_no_readable_checkpoint_stops_with_one_line(trained, text_file, env):
    for step in ("10", "20"):
        largest_file(trained / "checkpoints" / step).unlink()
    config_json = (trained / "config.json").read_text()
    line = one_error_line(train_cli(trained, text_file, env))
    assert "no checkpoint in" in line and "can be read" in line
    assert (trained / "config.json").read_text() == config_json


def test_a_failed_checkpoint_write_stops_the_run_and_keeps_the_previous_one(
        tmp_path, text_file, reference, env):
    workdir = tmp_path / "run"
    train(crash_config(str(text_file)), workdir, progress=False, stop_at_step=10)
    # The checkpoint's data file (~0.4 MB) cannot grow past 64 KiB; metrics files stay below it.
    done = train_cli(workdir, text_file, env, file_size_kib=64)
    line = one_error_line(done)
    assert "could not write the checkpoint of step 20" in line
    assert "the checkpoint of step 10 is intact" in line
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "10"]
    run = train(crash_config(str(text_file)), workdir, progress=False)  # resumes from 10
    assert run.start_step == 20 and losses(workdir) == reference


def test_a_second_process_on_the_same_workdir_is_refused(tmp_path, text_file, env):
    workdir = tmp_path / "run"
    lock = WorkdirLock(workdir)
    lock.acquire()  # this test process plays the first training process
    try:
        done = train_cli(workdir, text_file, env)
    finally:
        lock.release()
    line = one_error_line(done)
    assert f"pid {os.getpid()}" in line and "another process" in line
    assert not (workdir / "checkpoints").exists() and not (workdir / "config.json").exists()


def test_a_stale_lock_is_taken_over(tmp_path, text_file, caplog):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / LOCK_FILE).write_text("pid 999999 on some-host, started 2026-01-01T00:00:00")
    config = crash_config(str(text_file))
    config.unlock().train.steps = 2
    train(config, workdir, progress=False)
    assert any("pid 999999" in r.getMessage() and "did not end cleanly" in r.getMessage()
               for r in caplog.records)
    assert read_metrics(workdir)[-1]["step"] == 2


def test_the_error_line_starts_a_line_and_ends_the_output():
    """Library threads print tracebacks piece by piece (TensorStore after a failed write): the
    error line still starts a line of its own and nothing of theirs follows it."""
    import io
    import threading

    from experiments.common import _Stderr

    stream = io.StringIO()
    err = _Stderr(stream)
    other = threading.Thread(target=err.write, args=('  File "base_events.py", line 806',))
    other.start()
    other.join()
    err.last_word("error: could not write the checkpoint\n")
    late = threading.Thread(target=err.write, args=("RuntimeError: Event loop is closed\n",))
    late.start()
    late.join()
    err.write("exiting\n")  # the thread that wrote the error line still writes
    assert stream.getvalue().splitlines() == [
        '  File "base_events.py", line 806', "error: could not write the checkpoint", "exiting"]
