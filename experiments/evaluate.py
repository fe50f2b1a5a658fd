"""Evaluate a trained run on its whole validation split: `python -m experiments.evaluate
--workdir=DIR`. Prints one JSON line: validation loss (nats per token), perplexity and bits per
UTF-8 byte, over non-overlapping windows covering the validation split.
"""

from __future__ import annotations

import dataclasses
import json

from absl import app, flags, logging

from experiments.common import load_workdir_config, parse_flags, user_errors_as_one_line
from genai_jax.data import sequential_batches
from genai_jax.train import prepare

_WORKDIR = flags.DEFINE_string("workdir", None, "a directory written by experiments.train")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", 0, "cap on validation batches (0 = all)")
flags.mark_flags_as_required(["workdir"])


@user_errors_as_one_line
def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    config = load_workdir_config(_WORKDIR.value)
    run = prepare(config, _WORKDIR.value)
    batch = config.eval.batch_size or config.train.batch_size
    batches = sequential_batches(run.pipeline.info["validation_tokens"], batch,
                                 config.model.block_size, _MAX_BATCHES.value)
    run.pipeline = dataclasses.replace(run.pipeline, eval=batches)
    metrics = run.evaluate()
    tokens = len(batches) * batch * config.model.block_size
    print(json.dumps({"step": run.start_step, "validation_tokens": tokens, **metrics}))


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
