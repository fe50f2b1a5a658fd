"""Train an experiment: `python -m experiments.train --config=FILE --workdir=DIR [--config.K=V]`.

Rerunning the same command resumes from the latest checkpoint in DIR.
"""

from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.common import (
    config_from_flag,
    parse_flags,
    start_distributed,
    user_errors_as_one_line,
)
from genai_jax.train import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics, samples")
_SAMPLE = flags.DEFINE_bool("sample", True, "print a generated sample at the end")
flags.mark_flags_as_required(["config", "workdir"])


@user_errors_as_one_line
def main(argv):
    del argv
    start_distributed()
    config = config_from_flag(_CONFIG)
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # the progress bar and metrics.jsonl say enough
    run = train(config, _WORKDIR.value)
    if run.privacy is not None and jax.process_index() == 0:
        print(f"privacy after step {run.start_step}: {run.privacy.describe(run.start_step)}")
    if _SAMPLE.value and run.start_step >= config.train.steps:  # not after a preemption
        # Every process samples and draws (the parameters may be spread over all of them);
        # process 0 writes the files and prints.
        outputs = run.family.sample(run.state, jax.random.PRNGKey(config.seed))
        summary = run.family.save_samples(outputs, str(run.workdir / "samples"), run.start_step)
        if jax.process_index() == 0:
            print(f"\nsample at step {run.start_step}:\n{summary}")


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
