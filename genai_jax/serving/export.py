"""Write an export of a trained run (`experiments.export_compiled`): its samplers as
`jax.export` functions of plain arrays, the weights beside them (`genai_jax.serving.artifacts`).

Language models export two functions, both with a symbolic batch `b` and the KV cache (a list of
per-layer `{"k", "v"}` arrays `[b, kv_heads, t, head_dim]`, any length `t <= block_size`) as
explicit argument and result, so that a server can keep one cache of fixed slots, as long as its
longest sequence needs, and decode them together:
  prefill(weights, tokens int32[b, p], cache) -> (logits float32[b, p, vocab], cache)
      positions 0..p-1 (symbolic `p <= t`); right-padded rows are fine: a row's later tokens
      overwrite the padding's cache entries, and attention never reads past a query;
  decode(weights, tokens int32[b], positions int32[b], cache) -> (logits float32[b, vocab], cache)
      one token per row at that row's own position.
Image families export `generate(weights, key, labels)` (`genai_jax.serving.export_images`).

This module needs the model code; loading an export (`genai_jax.serving.lm`,
`genai_jax.serving.images`) does not.
"""

from __future__ import annotations

import dataclasses
import datetime
import pathlib
import shutil

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from flax import nnx
from jax import export as jax_export

import genai_jax
from genai_jax import parallel
from genai_jax.errors import UserError
from genai_jax.models.lm import model_config
from genai_jax.models.transformer import Transformer
from genai_jax.serving import artifacts, export_images
from genai_jax.tokenization.tokenizers import CHAT_TEMPLATE_FILE, HF_CONFIG_FILE, HF_FILE, OWN_FILE

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def parse_platforms(spec: str | None) -> tuple[str, ...]:
    """`--platforms=cpu,cuda,tpu` as a tuple; empty: this process's own platform."""
    names = tuple(p.strip() for p in (spec or "").split(",") if p.strip())
    unknown = [p for p in names if p not in PLATFORMS]
    if unknown:
        raise UserError(f"--platforms={spec}: {unknown[0]!r} is not one of {', '.join(PLATFORMS)}")
    return names or (artifacts.platform(),)


def export_run(run, out: str | pathlib.Path, platforms: tuple[str, ...]) -> dict:
    """Write `run`'s export into the new directory `out`; returns the manifest."""
    out = pathlib.Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty: export into a new directory")
    out.mkdir(parents=True, exist_ok=True)
    family = run.config.model.family
    fields = (_export_lm(run, out, platforms) if family == "transformer"
              else export_images.export_image_family(run, out, platforms))
    manifest = {
        "family": family, "platforms": list(platforms), **fields,
        "source": {"workdir": str(pathlib.Path(run.workdir).resolve()), "step": run.start_step},
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {"genai_jax": genai_jax.__version__, "jax": jax.__version__,
                     "jaxlib": jaxlib.__version__},
    }
    artifacts.write_manifest(out, manifest)
    return manifest


def _weights_and_state(params) -> tuple[dict[str, np.ndarray], nnx.State]:
    """Host copies of `params` (an nnx.State) as a flat dict, and an abstract state to rebuild
    it from one inside a traced function."""
    pure = parallel.fetch(nnx.to_pure_dict(params))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    return artifacts.flatten(pure), abstract


def rebuild(abstract: nnx.State, flat: dict) -> nnx.State:
    """The nnx.State `abstract` describes, with the arrays of the flat dict `flat`."""
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, artifacts.unflatten(flat))
    return state


def _export_lm(run, out: pathlib.Path, platforms: tuple[str, ...]) -> dict:
    tokenizer = run.pipeline.info["tokenizer"]
    # The model without adapters (`export_params` folds a LoRA run's adapters in), with the
    # portable XLA attention: "cudnn" and "pallas" lower for one platform only (and Pallas
    # runs interpreted on a CPU).
    cfg = dataclasses.replace(model_config(run.config, tokenizer.vocab_size), lora=None,
                              lora_targets=(), attention="xla")
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    weights, abstract = _weights_and_state(run.family.export_params(run.state))

    def model(flat):
        return nnx.merge(graphdef, rebuild(abstract, flat))

    def prefill(flat, tokens, cache):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return model(flat)(tokens, positions=positions, cache=cache)

    def decode(flat, tokens, positions, cache):
        logits, cache = model(flat)(tokens[:, None], positions=positions[:, None], cache=cache)
        return logits[:, 0], cache

    weight_specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in weights.items()}

    def cache_spec(b, t):
        shape = (b, cfg.kv_heads, t, cfg.head_dim)  # `init_cache`'s layout
        return [{name: jax.ShapeDtypeStruct(shape, jnp.dtype(cfg.dtype)) for name in ("k", "v")}
                for _ in range(cfg.num_layers)]

    # Symbolic batch `b` and cache length `t` (a server keeps its cache as long as its longest
    # sequence needs: decoding reads all of it); each function has its own symbolic scope.
    context = f"t <= {cfg.block_size}"
    b, p, t = jax_export.symbolic_shape("b, p, t", constraints=["p <= t", context])
    b1, t1 = jax_export.symbolic_shape("b, t", constraints=[context])
    functions = {
        "prefill": jax_export.export(jax.jit(prefill), platforms=platforms)(
            weight_specs, jax.ShapeDtypeStruct((b, p), jnp.int32), cache_spec(b, t)),
        "decode": jax_export.export(jax.jit(decode), platforms=platforms)(
            weight_specs, jax.ShapeDtypeStruct((b1,), jnp.int32),
            jax.ShapeDtypeStruct((b1,), jnp.int32), cache_spec(b1, t1)),
    }
    artifacts.save_weights(out, weights)
    copied = _copy_tokenizer(pathlib.Path(run.workdir), out)
    return {
        "functions": {name: artifacts.save_function(out, name, f)
                      for name, f in functions.items()},
        "lm": {"vocab_size": cfg.vocab_size, "tokenizer_size": tokenizer.vocab_size,
               "block_size": cfg.block_size,
               "num_layers": cfg.num_layers, "kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
               "cache_dtype": cfg.dtype, "cache_layout": "batch, kv_heads, position, head_dim",
               "eos_token_id": tokenizer.eos_token_id,
               "start_token": int(tokenizer.start_token),
               "chat_template": tokenizer.chat_template is not None},
        "tokenizer": {"files": copied},
        "sample": dict(run.config.sample),
    }


def _copy_tokenizer(workdir: pathlib.Path, out: pathlib.Path) -> list[str]:
    """The tokenizer files the run keeps in its workdir, copied beside the functions."""
    names = [n for n in (OWN_FILE, HF_FILE, HF_CONFIG_FILE, CHAT_TEMPLATE_FILE)
             if (workdir / n).is_file()]
    for name in names:
        shutil.copy2(workdir / name, out / name)
    return names
