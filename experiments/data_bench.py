"""Measure the input pipeline: tokens/s of the pipeline alone or of training through it, and
the peak resident memory of the process and its data workers summed; the last line printed is
one JSON object.

    # a generated corpus of JSONL files (deterministic), then shards of it
    python -m experiments.data_bench --generate_mb=200 --corpus=data/corpus200
    python -m experiments.prepare_data --input='data/corpus200/*.jsonl' --out=data/shards200
    # the pipeline alone, then training through it (lm_char.py-shaped, 2 workers)
    python -m experiments.data_bench --config=experiments/configs/lm_char.py \\
        --config.data.name=array_record --config.data.path=data/shards200 \\
        --config.data.workers=2 --steps=2000
    python -m experiments.data_bench --train --config=... --steps=200

Peak memory samples the resident set of this process and all its descendants (Grain's
workers) every 50 ms, summed at each sample (`peak_rss_mb`).
"""

from __future__ import annotations

import json
import pathlib
import tempfile
import threading
import time

import numpy as np
import psutil
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.common import config_from_flag, parse_flags, user_errors_as_one_line
from experiments.corpus import generate_corpus
from genai_jax import data as data_lib
from genai_jax import models
from genai_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=False)
_STEPS = flags.DEFINE_integer("steps", 1000, "steps to read (or to train, with --train)")
_TRAIN = flags.DEFINE_bool("train", False, "train through the pipeline instead of reading it")
_GENERATE_MB = flags.DEFINE_integer("generate_mb", 0, "write a generated JSONL corpus of this "
                                    "many MB to --corpus and stop")
_CORPUS = flags.DEFINE_string("corpus", None, "the folder --generate_mb writes")


class PeakMemory:
    """The peak over time of the summed resident memory of this process and its children."""

    def __init__(self, every_s: float = 0.05):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(every_s,), daemon=True)

    def _sample(self, every_s: float) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def cpu_model() -> str:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


@user_errors_as_one_line
def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if _GENERATE_MB.value:
        if not _CORPUS.value:
            raise UserError("--generate_mb needs --corpus=FOLDER")
        print(json.dumps(generate_corpus(pathlib.Path(_CORPUS.value), _GENERATE_MB.value)))
        return
    if not flags.FLAGS["config"].present:
        raise UserError("give --config=experiments/configs/FILE.py (or --generate_mb)")
    config = config_from_flag(_CONFIG)
    steps, k = _STEPS.value, config.train.steps_per_call
    result = {"config": config_flags.get_config_filename(flags.FLAGS["config"]),
              "data": config.data.name, "path": config.data.path,
              "workers": config.data.workers, "prefetch": config.data.prefetch,
              "batch_size": config.train.batch_size, "block_size": config.model.get("block_size"),
              "packing": bool(config.data.get("packing", False)), "cpu": cpu_model(),
              "cores": psutil.cpu_count()}
    with PeakMemory() as memory:
        if _TRAIN.value:
            from genai_jax.train import read_metrics, train

            config.unlock()
            config.train.steps = steps
            with tempfile.TemporaryDirectory() as workdir:
                t0 = time.perf_counter()
                train(config, workdir, progress=False)
                result["wall_s"] = time.perf_counter() - t0
                records = [m for m in read_metrics(workdir) if "train/loss" in m]
            per_s = [m[key] for m in records[1:] for key in m if key.endswith("_per_s")]
            result["train_per_s_median"] = float(np.median(per_s)) if per_s else None
            result["data_wait_ms_median"] = float(np.median(
                [m["train/data_wait_ms"] for m in records[1:]] or [np.nan]))
        else:
            pipeline = data_lib.build(config, models.modality(config.model.family))
            stream = pipeline.train.iterator(0, steps, steps_per_call=k,
                                             workers=config.data.workers,
                                             prefetch=config.data.prefetch)
            t0 = time.perf_counter()
            first = next(stream)
            t1 = time.perf_counter()
            per_stack = int(np.prod(first[next(iter(first))].shape[:2]))
            unit = "tokens" if "inputs" in first else "examples"
            del first  # batches are released as they are read, as in training
            read = 1
            for _batch in stream:
                read += 1
            t2 = time.perf_counter()
            _batch = None  # the last batch released before the pipeline closes
            data_lib.loader.close(stream)
            size = config.model.block_size if unit == "tokens" else 1
            result["first_batch_s"] = t1 - t0
            result[f"{unit}_per_s"] = (read - 1) * per_stack * size / (t2 - t1)
    result["peak_rss_mb"] = memory.peak / 2**20
    print(json.dumps(result))


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
