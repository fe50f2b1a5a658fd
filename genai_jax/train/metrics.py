"""Run metrics: `metrics.jsonl` (one object per logged step) and TensorBoard event files.

Only process 0 writes; other processes get a writer that does nothing.
"""

from __future__ import annotations

import json
import math
import pathlib

import jax


class MetricWriter:
    def __init__(self, workdir: str | pathlib.Path):
        self._active = jax.process_index() == 0
        self._file = self._tb = None
        if self._active:
            from tensorboardX import SummaryWriter

            workdir = pathlib.Path(workdir)
            self._file = (workdir / "metrics.jsonl").open("a")
            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """`metrics` keys are like `train/loss`, `eval/loss`; values are Python floats."""
        if not self._active:
            return
        record = {"step": int(step)}
        record.update({k: _json_number(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in metrics.items():
            self._tb.add_scalar(key, value, int(step))
        self._tb.flush()

    def close(self) -> None:
        if self._active:
            self._file.close()
            self._tb.close()


def _json_number(x: float):
    x = float(x)
    return x if math.isfinite(x) else str(x)  # JSON has no NaN/Inf literals


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
    """The records of `metrics.jsonl`, one per step in step order. A run that resumed from a
    checkpoint logs the steps after it again (they are appended): the last record of a step is
    the one that counts. A line cut short by a kill is skipped."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    by_step = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of a killed run (blank lines too)
        by_step.pop(record["step"], None)
        by_step[record["step"]] = record
    return sorted(by_step.values(), key=lambda r: r["step"])
