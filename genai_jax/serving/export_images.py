"""An image family's sampler as a `jax.export` artifact: `generate(weights, key, labels)`.

The exported function is the family's own `Family.generate` over `Family.export_params(state)`
(the GAN's EMA generator, the VAE's and the diffusion model's eval parameters), the one
`experiments.sample` calls, followed by the PNG writer's pixel conversion (`to_uint8`):

    generate(weights: {path: array}, key: uint32[2], labels: int32[n]) -> uint8[n, H, W, C]

`key` is a raw `jax.random.PRNGKey(seed)`; `n` is symbolic (one export serves every batch
size); labels are ignored by unconditional models. For the 2-D toy data ("points") the result
is the samples themselves, float32 `[n, dim]`. The weights are written beside it as plain
arrays (`weights.safetensors`, keyed by `/`-joined parameter paths), so that the function and
its loader (`genai_jax.serving.images`) need no flax: the `nnx.State` is rebuilt from the flat
dict inside the traced function. The sampler's settings (diffusion steps, guidance, ...) are
compiled in and listed in the manifest.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
from flax import nnx
from jax import export as jax_export

from genai_jax import parallel
from genai_jax.data.pixels import to_uint8
from genai_jax.serving import artifacts

FUNCTION = artifacts.IMAGE_FUNCTION


def sampler_settings(config, kind: str) -> dict:
    """The settings compiled into a family's exported sampler (from `config.sample`)."""
    s, m = config.sample, config.model
    if m.family == "diffusion":
        return {"sampler": s.sampler, "steps": s.steps or m.num_timesteps, "eta": s.eta,
                "guidance": s.guidance, "guidance_max_t": s.guidance_max_t,
                "clip_x0": bool(s.clip_x0 and kind == "image"), "prediction": m.prediction}
    if m.family == "vae":  # points always draw from p(x|z)
        return {"mean": bool(s.mean and kind == "image")}
    return {"z_dim": m.z_dim}


def exportable(generate, params, kind: str):
    """`fn(weights, key, labels)`: `generate(params, key, labels)` with `params` rebuilt from
    the flat weights (`artifacts.flatten(nnx.to_pure_dict(params))`), as uint8 images (or the
    float32 points)."""
    abstract = jax.eval_shape(lambda: params)

    def fn(weights: dict, key: jax.Array, labels: jax.Array) -> jax.Array:
        state = jax.tree.map(lambda a: a, abstract)  # a fresh State to fill in (done in place)
        nnx.replace_by_pure_dict(state, artifacts.unflatten(weights))
        x = generate(state, key, labels)
        return to_uint8(x, jnp) if kind == "image" else x.astype(jnp.float32)

    return fn


def export_image_family(run, out_dir: pathlib.Path, platforms: tuple[str, ...]) -> dict:
    """Write `run`'s sampler (`generate.jax_exported`, lowered for every one of `platforms`) and
    its weights (`weights.safetensors`) into `out_dir`; returns the family's manifest fields:
    `{"functions": {"generate": entry}, "image": {"kind", "shape", "num_classes",
    "conditional", "label_names", "sampler"}}`."""
    config, family, info = run.config, run.family, run.pipeline.info
    if family.generate is None:
        raise ValueError(f"model.family={config.model.family!r} has no image sampler to export")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = family.export_params(run.state)
    weights = artifacts.flatten(parallel.fetch(nnx.to_pure_dict(params)))
    artifacts.save_weights(out_dir, weights)

    kind = info["kind"]
    n = jax_export.symbolic_shape("n")[0]
    args = ({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in weights.items()},
            jax.ShapeDtypeStruct((2,), jnp.uint32), jax.ShapeDtypeStruct((n,), jnp.int32))
    exported = jax_export.export(jax.jit(exportable(family.generate, params, kind)),
                                 platforms=tuple(platforms))(*args)
    entry = artifacts.save_function(out_dir, FUNCTION, exported)
    names = info.get("label_names")
    return {"functions": {FUNCTION: entry},
            "image": {"kind": kind, "shape": [int(d) for d in info["shape"]],
                      "num_classes": int(info["num_classes"]),
                      "conditional": bool(config.model.conditional),
                      "label_names": list(names) if names else None,
                      "sampler": sampler_settings(config, kind)}}


__all__ = ["FUNCTION", "export_image_family", "exportable", "sampler_settings"]
