"""The generic trainer: loop, state, optimizers, checkpoints, metrics, EMA."""

from genai_jax.train.checkpoint import Checkpointer
from genai_jax.train.metrics import MetricWriter, read_metrics
from genai_jax.train.optim import learning_rate_schedule, make_optimizer
from genai_jax.train.state import TrainState, make_train_step
from genai_jax.train.trainer import Run, TrainingDiverged, prepare, train

__all__ = ["Checkpointer", "MetricWriter", "Run", "TrainState", "TrainingDiverged",
           "learning_rate_schedule", "make_optimizer", "make_train_step", "prepare",
           "read_metrics", "train"]
