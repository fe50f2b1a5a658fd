"""Data sets (TFDS data sources) and the input pipeline (batches of numpy arrays)."""

from genai_jax.data.lm_batches import LMBatches, eval_batches, sequential_batches
from genai_jax.data.pipeline import Pipeline, build
from genai_jax.data.text import TextData, load_text
from genai_jax.data.tokenizers import DataError, Tokenizer

__all__ = ["DataError", "LMBatches", "Pipeline", "TextData", "Tokenizer", "build", "eval_batches",
           "load_text", "sequential_batches"]
