"""Models in and out of other frameworks' formats (`huggingface`: Hugging Face checkpoints)."""
