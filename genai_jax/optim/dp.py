"""DP-SGD's gradient: per-example gradients clipped, summed, noised once, averaged.

Each example's gradient (its loss on a batch of one, with a key of its own) is clipped to
L2 norm `clip_norm` (jax-privacy's `clipped_grad`: `vmap` over the examples, in chunks of
`per_example_chunk` to bound memory, padding rows giving zero), the clipped gradients are
summed over the micro-batches of the step (`accumulate_gradients`, so gradient accumulation
composes: every example is still clipped on its own), Gaussian noise of standard deviation
`noise_multiplier * clip_norm` is added once, and the sum is divided by the expected batch
size (`train.batch_size`; a Poisson-sampled batch's actual size is private). Batches carry
`example_mask` (`genai_jax.data.private`): 0 marks padding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from jax_privacy.clipping import clipped_grad

from genai_jax import parallel
from genai_jax.config_checks import privacy_enabled
from genai_jax.optim.accumulate import accumulate_gradients

MASK = "example_mask"


@dataclasses.dataclass(frozen=True)
class DpSgd:
    clip_norm: float
    noise_multiplier: float
    expected_batch: int  # the sum of clipped gradients is divided by it
    per_example_chunk: int = 0  # examples vmapped at once (0: a whole micro-batch)


def from_config(config, data_info: dict) -> DpSgd | None:
    """The DP-SGD settings of `config.train.privacy`, its noise multiplier as the trainer
    resolved it (`data_info["noise_multiplier"]`, from a target epsilon when not given); None
    when the run is not private."""
    if not privacy_enabled(config):
        return None
    p = config.train.privacy
    noise = data_info.get("noise_multiplier", p.noise_multiplier)
    return DpSgd(p.clip_norm, 0.0 if noise is None else float(noise),
                 config.train.batch_size, p.per_example_chunk)


def private_gradients(loss_fn, params, batch: dict, rng: jax.Array, dp: DpSgd,
                      accum_steps: int = 1):
    """`(loss, metrics, gradient)` of DP-SGD for `loss_fn(params, batch, rng) -> (loss,
    metrics)` (a mean over its batch). Loss and metrics are means over the batch's real
    examples (not private: the training curve); `clipped_fraction` is the share of them whose
    gradient norm exceeded `clip_norm`."""
    def one_example(params, rows, key):
        with parallel.unconstrained():  # the model's batch here is one example: see there
            return loss_fn(params, rows, key)

    per_example = clipped_grad(one_example, has_aux=True, l2_clip_norm=dp.clip_norm,
                               batch_argnums=1, prng_argnum=2, keep_batch_dim=True,
                               return_values=True, return_grad_norms=True,
                               microbatch_size=dp.per_example_chunk or None)

    def micro_batch(p, rows, key):
        mask = rows[MASK]
        examples = {k: v for k, v in rows.items() if k != MASK}
        grads, aux = per_example(p, examples, key, is_padding_example=mask == 0)
        sums = {"loss": aux.values, "clipped_fraction": aux.grad_norms > dp.clip_norm,
                **aux.aux}
        sums = {k: jnp.sum(v.reshape(mask.shape[0], -1).mean(axis=1) * mask)
                for k, v in sums.items()}
        return grads, {**sums, "examples": jnp.sum(mask)}

    data_rng, noise_rng = jax.random.split(rng)
    grads, sums = accumulate_gradients(micro_batch, params, batch, data_rng, accum_steps,
                                       mean=False)
    noise = optax.tree.random_like(noise_rng, grads, jax.random.normal)
    std = dp.noise_multiplier * dp.clip_norm
    grads = jax.tree.map(lambda g, z: (g + std * z) / dp.expected_batch, grads, noise)
    count = jnp.maximum(sums.pop("examples"), 1.0)
    metrics = {k: v / count for k, v in sums.items()}
    return metrics.pop("loss"), metrics, grads
