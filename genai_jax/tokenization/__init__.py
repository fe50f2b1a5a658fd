"""Tokenizers (byte, char, GPT-2 BPE, Hugging Face, trained BPE) and chat templates.

Imports neither flax nor the data pipeline, so that a served export (`genai_jax.serving`) can
encode and decode text without the model code.
"""

from genai_jax.errors import DataError
from genai_jax.tokenization.chat_templates import ChatTemplateError, render_chat
from genai_jax.tokenization.tokenizers import (
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    make_tokenizer,
    parse_spec,
)

__all__ = ["ChatTemplateError", "DataError", "HFTokenizer", "Tokenizer", "load_tokenizer",
           "make_tokenizer", "parse_spec", "render_chat"]
