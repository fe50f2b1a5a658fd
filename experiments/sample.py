"""Sample from a trained run: `python -m experiments.sample --workdir=DIR [flags]`.

Reads the config (and tokenizer) saved in DIR and its latest checkpoint, and writes the samples
under DIR/samples. Language models: several `--prompt` flags decode together as one batch (KV
cache, compiled once). Image families: `--num_samples` images (classes cycling 0, 1, ... for a
conditional model, or through the `--label`s given) as a PNG grid, plus the family's own
pictures (VAE reconstructions and interpolations, the diffusion trajectory strip).
"""

from __future__ import annotations

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
from genai_jax.train import prepare

_WORKDIR = flags.DEFINE_string("workdir", None, "a directory written by experiments.train")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "prompt(s); default: the config's")
_NEW = flags.DEFINE_integer("max_new_tokens", None, "tokens to generate per prompt")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "0 = greedy")
_TOP_K = flags.DEFINE_integer("top_k", None, "keep the k most likely tokens (0 = all)")
_TOP_P = flags.DEFINE_float("top_p", None, "nucleus sampling mass (1 = off)")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", None, "images to generate (image families)")
_LABEL = flags.DEFINE_multi_integer("label", None, "classes to draw, cycled to --num_samples "
                                    "(conditional models)")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_MESH = define_mesh_flag()
flags.mark_flags_as_required(["workdir"])


@user_errors_as_one_line
def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    start_distributed()
    run = prepare(with_mesh(load_workdir_config(_WORKDIR.value), _MESH.value), _WORKDIR.value,
                  read_only=True)
    if run.start_step == 0:
        logging.warning("%s has no checkpoint: sampling from an untrained model", _WORKDIR.value)
    options = {"prompts": _PROMPT.value, "max_new_tokens": _NEW.value,
               "temperature": _TEMPERATURE.value, "top_k": _TOP_K.value, "top_p": _TOP_P.value,
               "num_samples": _NUM_SAMPLES.value, "labels": _LABEL.value}
    outputs = run.family.sample(run.state, jax.random.PRNGKey(_SEED.value),
                                **{k: v for k, v in options.items() if v is not None})
    summary = run.family.save_samples(outputs, str(run.workdir / "samples"), run.start_step)
    if jax.process_index() == 0:  # every process draws (see `sample`), process 0 writes
        print(summary)


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
