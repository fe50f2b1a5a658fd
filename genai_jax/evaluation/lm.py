"""Language-model metrics from a mean next-token cross-entropy (nats per token)."""

from __future__ import annotations

import math


def lm_metrics(loss: float, bytes_per_token: float) -> dict[str, float]:
    """loss, perplexity and bits per UTF-8 byte (comparable across tokenizers)."""
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_byte": loss / math.log(2) / bytes_per_token}
