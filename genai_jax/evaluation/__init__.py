"""Evaluation metrics."""

from genai_jax.evaluation.lm import lm_metrics

__all__ = ["lm_metrics"]
