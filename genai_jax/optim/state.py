"""The training state pytree of a family with one parameter set (LM, VAE, diffusion)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from genai_jax.optim.ema import init_ema


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: a plain pytree, printable and checkpointable."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # nnx.State of the model's parameters (with logical-axis metadata)
    opt_state: optax.OptState
    ema: Any  # exponential moving average of params (`genai_jax.optim.ema`), or None
    rng: jax.Array  # uint32[2] base key; step keys are fold_in(rng, step)

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, rng: jax.Array,
               ema_decay: float = 0.0) -> TrainState:
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   ema=init_ema(params, ema_decay), rng=rng)

    @property
    def eval_params(self):
        """The parameters to evaluate and sample with: the EMA when one is kept."""
        return self.params if self.ema is None else self.ema
