"""The training state pytree of a family with one parameter set (LM, VAE, diffusion)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from genai_jax.optim.ema import init_ema


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: a plain pytree, printable and checkpointable."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # nnx.State of the model's parameters (with logical-axis metadata)
    opt_state: optax.OptState
    ema: Any  # exponential moving average of params (`genai_jax.optim.ema`), or None
    rng: jax.Array  # uint32[2] base key; step keys are fold_in(rng, step)
    # Parameters the model uses but training does not change (a LoRA run's base model), or
    # None; `params` (and the optimizer state, and the EMA) then hold only the trained ones.
    frozen: Any = None

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, rng: jax.Array,
               ema_decay: float = 0.0, frozen=None) -> TrainState:
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   ema=init_ema(params, ema_decay), rng=rng, frozen=frozen)

    @property
    def eval_params(self):
        """The parameters to evaluate and sample with: the EMA when one is kept, with the
        frozen ones merged in."""
        return with_frozen(self.params if self.ema is None else self.ema, self.frozen)


def with_frozen(params, frozen):
    """The model's whole parameter state from its trained and frozen parts (nnx.States)."""
    return params if frozen is None else nnx.merge_state(frozen, params)
