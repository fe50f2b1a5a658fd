"""Training runs under several meshes, run in a subprocess with simulated CPU devices.

    python tests/sharded_runs.py OUT.json TEXT_FILE WORKDIR LAYOUT [LAYOUT ...]

LAYOUT is `data,fsdp,tensor` (their product must be this process's device count, set by the
caller through XLA_FLAGS). For each layout it trains the tiny LM of `conftest.tiny_lm_config`
for 20 steps (privately, with DP-SGD, for 10; federated, for 4 rounds) and small conditional
image models on the embedded digits for 4 steps (the GAN on every layout, the VAE and
diffusion on `1,1,1` and `2,2,2`), and records their losses and the bytes of training state
each device holds. Under `fsdp=8` it also stops the LM at step 10 and resumes it under
`data=2 x fsdp=2 x tensor=2` (a checkpoint restored onto another mesh). Everything lands in
one JSON file, so `test_parallel.py` pays JAX's start-up and the compilations once per device count.
"""

from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402
from conftest import overridden, tiny_lm_config  # noqa: E402

from genai_jax import parallel  # noqa: E402
from genai_jax.config import base_config  # noqa: E402
from genai_jax.train import train  # noqa: E402
from genai_jax.train.metrics import read_metrics  # noqa: E402


def mesh_overrides(layout: str) -> dict:
    return {f"mesh.{a}": int(s) for a, s in zip(parallel.AXES, layout.split(","), strict=True)}


def lm_config(text_file: str, layout: str, **overrides):
    return tiny_lm_config(**{"data.path": text_file, "train.batch_size": 8, "train.log_every": 1,
                             "eval.batch_size": 8, **mesh_overrides(layout), **overrides})


# Small conditional image models on the embedded digits (their two parameter sets make the GAN
# the interesting case for FSDP).
IMAGE_MODELS = {
    "gan": dict(conditional=True, z_dim=8, g_channels=8, d_channels=8, label_dim=8),
    "vae": dict(conditional=True, latent_dim=8, channels=16, stages=2, blocks=1, hidden=64),
    "diffusion": dict(conditional=True, channels=8, channel_mult=(1,), num_res_blocks=1,
                      attention_max_side=8, num_heads=2, groups=4),
}


# A private LM: Poisson-sampled batches (padded to a cap that depends on the mesh, with the
# same units in them), per-example gradients in chunks, the noise drawn on the mesh.
DP_LM = {"train.steps": 10, "train.grad_clip": 0.0, "train.grad_accum_steps": 2,
         "train.privacy.noise_multiplier": 0.5, "train.privacy.per_example_chunk": 4,
         "eval.every": 10, "checkpoint.every": 10}


# A federated LM: 3 clients per round of 8, padded to a multiple of the data-parallel devices
# (the clients split over them); the padding slots change nothing. Adam clients whose moments
# the server keeps (sharded like the parameters), clients drawn by size.
FED_LM = {"train.steps": 4, "train.batch_size": 2, "train.federated.clients_per_round": 3,
          "train.federated.num_clients": 8, "train.federated.local_steps": 2,
          "train.federated.client_optimizer": "adam", "train.federated.client_lr": 0.01,
          "train.federated.client_moments": "averaged",
          "train.federated.client_sampling": "by_size", "eval.every": 4, "checkpoint.every": 4}


def image_config(family: str, layout: str):
    c = base_config(family)
    c.data.name = "digits"
    c.model.update(IMAGE_MODELS[family])
    c.train.update(steps=4, batch_size=16, log_every=1, warmup_steps=1, ema_decay=0.9)
    c.eval.update(every=4, steps=1, num_samples=0)
    c.checkpoint.update(every=4)
    return overridden(c, mesh_overrides(layout))


def losses(workdir) -> dict[str, list[float]]:
    """The training loss of every step and the evaluation losses."""
    metrics = read_metrics(workdir)
    return {key: [r[f"{key}/loss"] for r in metrics if f"{key}/loss" in r]
            for key in ("train", "eval")}


def state_bytes(run) -> dict:
    held = parallel.bytes_per_device(run.state)
    return {"per_device": sorted(held.values()), "total": sum(held.values()),
            # the biggest array of the state: how it is split, shard by shard
            "largest_array_shards": max(
                ([s.data.nbytes for s in leaf.addressable_shards]
                 for leaf in jax.tree.leaves(run.state)), key=sum)}


def main(out: str, text_file: str, workdir: str, *layouts: str) -> None:
    root, results = pathlib.Path(workdir), {}
    for layout in layouts:
        tag = layout.replace(",", "x")
        result = results[layout] = {}
        # The GAN on every layout; the VAE and diffusion (slower to compile) on one device and on
        # the layout that uses all three mesh axes.
        families = ["lm", "lm_dp", "lm_fed", "gan"] + (
            ["vae", "diffusion"] if layout in ("1,1,1", "2,2,2") else [])
        for family in families:
            if family == "lm":
                config = lm_config(text_file, layout)
            elif family == "lm_dp":  # DP-SGD: per-example gradients split over the data axes
                config = lm_config(text_file, layout, **DP_LM)
            elif family == "lm_fed":  # federated: clients split over the data axes
                config = lm_config(text_file, layout, **FED_LM)
            else:
                config = image_config(family, layout)
            run = train(config, root / f"{family}_{tag}", progress=False)
            result[family] = {"losses": losses(run.workdir), "bytes": state_bytes(run)}
        if layout == "1,8,1":
            resumed = root / "lm_resharded"
            train(lm_config(text_file, "1,8,1"), resumed, progress=False, stop_at_step=10)
            train(lm_config(text_file, "2,2,2"), resumed, progress=False)
            results["resharded_lm_losses"] = losses(resumed)
    pathlib.Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
