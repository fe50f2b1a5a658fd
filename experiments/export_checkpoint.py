"""Export a genai_jax run as a Hugging Face model directory:
`python -m experiments.export_checkpoint --workdir=W --hf_dir=DIR`.

Writes DIR: `config.json`, the weights as safetensors (`model.safetensors`, or shards with
`model.safetensors.index.json` above `--max_shard_mb`) and the tokenizer files, which
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads with the same logits. The run's
architecture is the one it was imported as, or the one its `model.*` keys map onto exactly:
learned positions export as GPT-2 (e.g. `lm_char.py`), rotary ones with RMSNorm and SwiGLU as
Llama (Qwen2 with q/k/v-only biases). The parameters evaluated and sampled with are exported
(the EMA when the run keeps one); a LoRA run's adapters are folded into the weights.

`--adapter_only` writes a LoRA run's adapters alone in PEFT's format instead
(`adapter_config.json` + `adapter_model.safetensors`), for
`peft.PeftModel.from_pretrained(base, DIR)` on the Hugging Face model the run started from.
"""

from __future__ import annotations

import json
import pathlib

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
from genai_jax.errors import UserError
from genai_jax.interop import huggingface as hf
from genai_jax.models.lm import model_config
from genai_jax.train import prepare

_WORKDIR = flags.DEFINE_string("workdir", None, "a genai_jax workdir (trained or imported)")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "the Hugging Face directory to write")
_MAX_SHARD_MB = flags.DEFINE_float("max_shard_mb", 2000, "largest safetensors file; larger "
                                     "models are sharded with an index")
_ADAPTER_ONLY = flags.DEFINE_bool("adapter_only", False, "write only a LoRA run's adapters, in "
                                  "PEFT's format")
_MESH = define_mesh_flag()
flags.mark_flags_as_required(["workdir", "hf_dir"])


@user_errors_as_one_line
def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    start_distributed()
    config = with_mesh(load_workdir_config(_WORKDIR.value), _MESH.value)
    if config.model.family != "transformer":
        raise UserError(f"only transformer language models export to Hugging Face format; "
                        f"{_WORKDIR.value} holds a {config.model.family!r} model")
    kind = _architecture(config, pathlib.Path(_WORKDIR.value))
    out = pathlib.Path(_HF_DIR.value)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--hf_dir {out} is not empty: export into a new directory")
    run = prepare(config, _WORKDIR.value, read_only=True)
    if run.start_step == 0 and run.checkpointer.latest_step() is None:
        raise UserError(f"{_WORKDIR.value} has no checkpoint to export")
    tokenizer = run.pipeline.info["tokenizer"]
    cfg = model_config(config, tokenizer.vocab_size)
    if _ADAPTER_ONLY.value:
        state = run.state
        adapter_config, tensors = hf.export_adapter(
            state.params if state.ema is None else state.ema, cfg, kind)
        adapter_config["base_model_name_or_path"] = _base_model(config)
        if jax.process_index() == 0:
            hf.write_safetensors(tensors, out, name="adapter_model.safetensors")
            (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
            print(f"exported the LoRA adapters of step {run.start_step} of {_WORKDIR.value} to "
                  f"{out}")
        else:
            for _ in tensors:
                pass
        return
    tensors = hf.export_tensors(run.family.export_params(run.state), cfg, kind)
    if jax.process_index() != 0:  # every process fetches its share; process 0 writes
        for _ in tensors:
            pass
        return
    files = hf.write_safetensors(tensors, out, int(_MAX_SHARD_MB.value * 1024 ** 2))
    hf_config = hf.export_config(cfg, kind, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, dtype=cfg.param_dtype)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    hf.save_tokenizer(tokenizer, out)
    print(f"exported step {run.start_step} of {_WORKDIR.value} as {kind} to {out} "
          f"({len(files)} weight file{'s' * (len(files) > 1)})")


def _architecture(config, workdir: pathlib.Path) -> str:
    """The architecture the run (or the run it started from) was imported as, else the one its
    `model.*` keys map onto."""
    for directory in (workdir, pathlib.Path(config.init_from) if config.init_from else None):
        if directory is not None and (directory / hf.IMPORT_FILE).exists():
            return json.loads((directory / hf.IMPORT_FILE).read_text())["architecture"]
    return hf.export_architecture(config.model)


def _base_model(config) -> str | None:
    """The Hugging Face directory the run's base model was imported from, if it was."""
    source = pathlib.Path(config.init_from) / hf.IMPORT_FILE if config.init_from else None
    return json.loads(source.read_text())["hf_dir"] if source and source.exists() else None


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
