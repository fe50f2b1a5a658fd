"""What the model families share below the trainer: the train state, the train-step builder,
optimizers, the EMA of parameters, gradient accumulation, DP-SGD's gradient and a round of
federated averaging.

It sits below `genai_jax.models` (families import it) and above nothing of theirs, so a family
never imports the trainer, whose package imports the families.
"""

from genai_jax.optim.accumulate import accumulate_gradients
from genai_jax.optim.dp import DpSgd
from genai_jax.optim.dp import from_config as privacy_from_config
from genai_jax.optim.ema import ema_decay, ema_update, init_ema
from genai_jax.optim.federated import FedAvg
from genai_jax.optim.federated import from_config as federated_from_config
from genai_jax.optim.optimizers import decay_mask, learning_rate_schedule, make_optimizer
from genai_jax.optim.state import TrainState
from genai_jax.optim.step import make_train_step

__all__ = ["DpSgd", "FedAvg", "TrainState", "accumulate_gradients", "decay_mask", "ema_decay",
           "ema_update", "federated_from_config", "init_ema", "learning_rate_schedule",
           "make_optimizer", "make_train_step", "privacy_from_config"]
