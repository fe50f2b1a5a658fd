"""The generic trainer: loop, checkpoints, metrics, preemption.

The train state, train-step builder and optimizers live in `genai_jax.optim` (below the
families, which use them); they are re-exported here for scripts written against this package.
"""

from genai_jax.optim import TrainState, learning_rate_schedule, make_optimizer, make_train_step
from genai_jax.train.checkpoint import Checkpointer
from genai_jax.train.metrics import MetricWriter, read_metrics
from genai_jax.train.trainer import Run, TrainingDiverged, prepare, train

__all__ = ["Checkpointer", "MetricWriter", "Run", "TrainState", "TrainingDiverged",
           "learning_rate_schedule", "make_optimizer", "make_train_step", "prepare",
           "read_metrics", "train"]
