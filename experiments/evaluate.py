"""Evaluate a trained run on its whole held-out split: `python -m experiments.evaluate
--workdir=DIR`. Prints one JSON line.

Language models: validation loss (nats per token), perplexity and bits per UTF-8 byte over
non-overlapping windows covering the validation split (instruction data: every packed held-out
window, the loss on completion tokens). Image families: their held-out metrics
over the whole held-out split (e.g. the VAE's ELBO and importance-weighted NLL), then the
sample-based metrics of `--num_samples` generated samples (classifier Fréchet distance and its
real-vs-real floor, classifier accuracy of conditional samples, classifier score; see
`genai_jax.evaluation.images`), also written as a PNG grid under DIR/samples. `--set` changes
evaluation and sampling settings (`eval.*`, `sample.*`) of the saved config for this evaluation
only.
"""

from __future__ import annotations

import dataclasses
import json

import jax
from absl import app, flags, logging

from experiments.common import (
    define_mesh_flag,
    load_workdir_config,
    parse_flags,
    start_distributed,
    user_errors_as_one_line,
    with_mesh,
)
from genai_jax import models
from genai_jax.data import images, sequential_batches
from genai_jax.data.instructions import eval_batches as instruction_batches
from genai_jax.errors import UserError
from genai_jax.train import prepare

_WORKDIR = flags.DEFINE_string("workdir", None, "a directory written by experiments.train")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", 0, "cap on validation batches (0 = all)")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 0, "samples for the sample-based metrics of "
                                    "image families (0 = the config's eval.num_samples)")
_SET = flags.DEFINE_multi_string("set", [], "eval.KEY=VALUE or sample.KEY=VALUE: change a setting "
                                 "of the saved config for this evaluation, e.g. "
                                 "--set=eval.binarize=stochastic (VAE), --set=sample.guidance=3")
_MESH = define_mesh_flag()
flags.mark_flags_as_required(["workdir"])


def set_eval_keys(config, assignments: list[str]) -> None:
    """Apply `eval.KEY=VALUE` / `sample.KEY=VALUE` assignments, each VALUE parsed as the type of
    the key's value: these change what is measured (and how samples are drawn), never the
    state that is measured. A run saved before its family gained a key gets the key's default."""
    defaults = models.module(config.model.family).config_defaults()
    for assignment in assignments:
        key, _, value = assignment.partition("=")
        section, _, leaf = key.partition(".")
        known = ({**defaults.get(section, {}), **config[section]}
                 if section in ("eval", "sample") else {})
        if leaf not in known:
            raise UserError(f"--set={assignment}: only existing eval.* and sample.* keys can be "
                            "set")
        old = known[leaf]
        try:
            with config.unlocked():
                config[section][leaf] = (value.lower() in ("1", "true") if isinstance(old, bool)
                                         else type(old)(value))
        except ValueError:
            raise UserError(f"--set={assignment}: {value!r} is not a {type(old).__name__}, "
                            f"the type of {key}") from None


@user_errors_as_one_line
def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    start_distributed()
    config = with_mesh(load_workdir_config(_WORKDIR.value), _MESH.value)
    if _NUM_SAMPLES.value and "num_samples" in config.eval:
        config.unlock().eval.num_samples = _NUM_SAMPLES.value
        config.lock()
    set_eval_keys(config, _SET.value)  # prepare() validates the result
    run = prepare(config, _WORKDIR.value, read_only=True)
    batch = config.eval.batch_size or config.train.batch_size
    info = run.pipeline.info
    if "validation_windows" in info:  # instruction data: every packed held-out window
        windows = info["validation_windows"]
        batches = instruction_batches(windows, batch, _MAX_BATCHES.value or len(windows))
        extent = {"validation_windows": len(windows)}
    elif "validation_tokens" in info:
        batches = sequential_batches(info["validation_tokens"], batch,
                                     config.model.block_size, _MAX_BATCHES.value)
        extent = {"validation_tokens": len(batches) * batch * config.model.block_size}
    elif models.modality(config.model.family) == "text":
        # text tokenised on the fly, or a mixture: the training run's random held-out windows
        batches = run.pipeline.eval[:_MAX_BATCHES.value or None]
        extent = {"validation_windows": len(batches) * batch}
    else:
        batches = images.eval_batches(run.pipeline.info["data"].validation, batch,
                                      _MAX_BATCHES.value)
        extent = {"heldout_examples": len(batches) * batch}
    run.pipeline = dataclasses.replace(run.pipeline, eval=batches)
    metrics = run.evaluate()
    if jax.process_index() == 0:
        print(json.dumps({"step": run.start_step, **extent, **metrics}))


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
