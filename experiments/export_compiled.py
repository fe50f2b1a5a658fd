"""Export a trained run's samplers with `jax.export`:
`python -m experiments.export_compiled --workdir=W --out=DIR [--platforms=cpu,cuda,tpu]`.

Writes DIR (`genai_jax.serving.artifacts`): the language model's prefill and decode-step
functions (symbolic batch, the KV cache as explicit input and output), or an image family's
sampler (diffusion DDIM with guidance, GAN generator, VAE decoder; labels as input), serialized
StableHLO for every platform asked for; the weights beside them as plain arrays
(`weights.safetensors`); the tokenizer; and `manifest.json` (shapes, dtypes, platforms,
versions). `genai_jax.serving` runs it without the model code or flax;
`python -m experiments.serve --export=DIR` serves it.
"""

from __future__ import annotations

import json

from absl import app, flags, logging

from experiments.common import (
    define_mesh_flag,
    load_workdir_config,
    parse_flags,
    user_errors_as_one_line,
    with_mesh,
)
from genai_jax.serving import export
from genai_jax.train import prepare

_WORKDIR = flags.DEFINE_string("workdir", None, "a directory written by experiments.train")
_OUT = flags.DEFINE_string("out", None, "the export directory to write (new or empty)")
_PLATFORMS = flags.DEFINE_string("platforms", None, "comma-separated platforms to lower for "
                                 "(cpu, cuda, rocm, tpu); default: this machine's")
_MESH = define_mesh_flag()
flags.mark_flags_as_required(["workdir", "out"])


@user_errors_as_one_line
def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    platforms = export.parse_platforms(_PLATFORMS.value)
    run = prepare(with_mesh(load_workdir_config(_WORKDIR.value), _MESH.value), _WORKDIR.value,
                  read_only=True)
    if run.start_step == 0:
        logging.warning("%s has no checkpoint: exporting an untrained model", _WORKDIR.value)
    manifest = export.export_run(run, _OUT.value, platforms)
    print(json.dumps({"out": _OUT.value, "family": manifest["family"],
                      "platforms": manifest["platforms"],
                      "functions": sorted(manifest["functions"]),
                      "step": manifest["source"]["step"]}))


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
