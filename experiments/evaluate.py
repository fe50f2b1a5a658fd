"""Evaluate a trained run on its whole held-out split: `python -m experiments.evaluate
--workdir=DIR`. Prints one JSON line.

Language models: validation loss (nats per token), perplexity and bits per UTF-8 byte over
non-overlapping windows covering the validation split. Image families: their held-out metrics
over the whole held-out split (e.g. the VAE's ELBO and importance-weighted NLL), then the
sample-based metrics of `--num_samples` generated samples (classifier Fréchet distance and its
real-vs-real floor, classifier accuracy of conditional samples, classifier score; see
`genai_jax.evaluation.images`), also written as a PNG grid under DIR/samples.
"""

from __future__ import annotations

import dataclasses
import json

from absl import app, flags, logging

from experiments.common import load_workdir_config, parse_flags, user_errors_as_one_line
from genai_jax import models
from genai_jax.data import images, sequential_batches
from genai_jax.train import prepare

_WORKDIR = flags.DEFINE_string("workdir", None, "a directory written by experiments.train")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", 0, "cap on validation batches (0 = all)")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 0, "samples for the sample-based metrics of "
                                    "image families (0 = the config's eval.num_samples)")
flags.mark_flags_as_required(["workdir"])


@user_errors_as_one_line
def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    config = load_workdir_config(_WORKDIR.value)
    if _NUM_SAMPLES.value and "num_samples" in config.eval:
        config.unlock().eval.num_samples = _NUM_SAMPLES.value
        config.lock()
    run = prepare(config, _WORKDIR.value)
    batch = config.eval.batch_size or config.train.batch_size
    if models.modality(config.model.family) == "text":
        batches = sequential_batches(run.pipeline.info["validation_tokens"], batch,
                                     config.model.block_size, _MAX_BATCHES.value)
        extent = {"validation_tokens": len(batches) * batch * config.model.block_size}
    else:
        batches = images.eval_batches(run.pipeline.info["data"].validation, batch,
                                      _MAX_BATCHES.value)
        extent = {"heldout_examples": len(batches) * batch}
    run.pipeline = dataclasses.replace(run.pipeline, eval=batches)
    metrics = run.evaluate()
    print(json.dumps({"step": run.start_step, **extent, **metrics}))


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
