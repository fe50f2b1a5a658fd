"""Import a Hugging Face checkpoint into a genai_jax workdir:
`python -m experiments.import_checkpoint --hf_dir=DIR --workdir=OUT`.

Reads DIR's `config.json`, its safetensors weights (`model.safetensors`, or the shards of
`model.safetensors.index.json`) and its `tokenizer.json`, and writes OUT: `config.json` (the
model's `model.*` keys on the default experiment config), the tokenizer, `hf_import.json` (where
it came from) and an Orbax checkpoint of the parameters at step 0. `experiments.sample`,
`experiments.evaluate`, `experiments.benchmark` and fine-tuning (`config.init_from=OUT`) then
work on OUT as on a trained run. GPT-2, Llama, Mistral and Qwen2 are supported
(`genai_jax.interop.huggingface`); anything else is refused with one line, before anything is
written.

Each weight goes straight onto the run's mesh (`--mesh=1,8,1`: FSDP over 8 devices) in the
parameter dtype asked for (`--param_dtype=bfloat16` halves an fp32 checkpoint), one tensor at a
time, so the host holds about one copy of the weights.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
from absl import app, flags, logging

from experiments.common import parse_flags, start_distributed, user_errors_as_one_line, with_mesh
from genai_jax import config as config_lib
from genai_jax import parallel
from genai_jax.errors import UserError
from genai_jax.interop import huggingface as hf
from genai_jax.models.lm import model_config
from genai_jax.tokenization.tokenizers import HFTokenizer
from genai_jax.train import provenance
from genai_jax.train.checkpoint import Checkpointer

_HF_DIR = flags.DEFINE_string("hf_dir", None, "a Hugging Face model directory")
_WORKDIR = flags.DEFINE_string("workdir", None, "the genai_jax workdir to write (new or empty)")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 0, "context of the imported model (0 = the "
                                   "checkpoint's; may not exceed it)")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"],
                                 "dtype the parameters are stored and trained in")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
_MESH = flags.DEFINE_string("mesh", None, "DATA,FSDP,TENSOR mesh the weights are placed on, e.g. "
                            "1,8,1 (default: the experiment default, data over every device)")
flags.mark_flags_as_required(["hf_dir", "workdir"])


def build_config(hf_config: dict, workdir: pathlib.Path, *, block_size: int = 0,
                 param_dtype: str = "float32", dtype: str = "float32"):
    """The default transformer experiment config with the checkpoint's `model.*` keys and its
    tokenizer (the copy in `workdir`)."""
    config = config_lib.base_config("transformer")
    keys = hf.model_keys(hf_config, block_size or None)
    config.model.update(keys, param_dtype=param_dtype, dtype=dtype)
    config.data.tokenizer = f"hf:{workdir.absolute()}"
    config.train.batch_size = 8  # divides over 1, 2, 4 or 8 devices (sampling, evaluation)
    config.lock()
    return config


@user_errors_as_one_line
def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    start_distributed()
    hf_dir, workdir = pathlib.Path(_HF_DIR.value), pathlib.Path(_WORKDIR.value)
    if (workdir / "config.json").exists() or (workdir / "checkpoints").exists():
        raise UserError(f"--workdir {workdir} already holds a run: import into a new directory")
    hf_config = hf.read_config(hf_dir)
    eos = hf_config.get("eos_token_id")
    tokenizer = HFTokenizer.from_dir(hf_dir, bos_token_id=hf_config.get("bos_token_id"),
                                     eos_token_id=eos[0] if isinstance(eos, list) else eos)
    config = build_config(hf_config, workdir, block_size=_BLOCK_SIZE.value,
                          param_dtype=_PARAM_DTYPE.value, dtype=_DTYPE.value)
    if _MESH.value:
        config = with_mesh(config, _MESH.value)
    cfg = model_config(config, tokenizer.vocab_size)  # refuses a tokenizer larger than the model
    mesh = parallel.make_mesh(config.mesh)
    rules = parallel.rules_from_config(config.mesh)
    shardings = parallel.state_shardings(hf.abstract_params(cfg), mesh, rules)
    params = hf.load_params(hf_dir, cfg, shardings)  # every check on the files happens here

    # Nothing was written before this point.
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(workdir)
        (workdir / hf.IMPORT_FILE).write_text(json.dumps(
            {"hf_dir": str(hf_dir.absolute()), "architecture": hf.architecture(hf_config),
             "hf_config": hf_config}, indent=2) + "\n")
    # One array at a time (the largest bounds it), in chunks of 4 MiB: the host holds about
    # one copy of the weights while they are written, not two.
    largest = max(x.nbytes for x in jax.tree.leaves(params))
    checkpointer = Checkpointer(workdir / "checkpoints", async_save=False,
                                save_concurrent_bytes=largest, chunk_bytes=4 * 2**20)
    try:
        checkpointer.save(0, params, {"data_step": 0}, params_only=True)
    except BaseException:
        checkpointer.close()
        if jax.process_index() == 0:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    checkpointer.close()
    if jax.process_index() == 0:
        config_lib.save(config, workdir / "config.json")  # last: it marks the import complete
        provenance.record(workdir, 0)
        n = sum(x.size for x in jax.tree.leaves(params))
        print(f"imported {hf.architecture(hf_config)} ({n / 1e6:.1f}M parameters, "
              f"{cfg.param_dtype}) from {hf_dir} into {workdir}")


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
