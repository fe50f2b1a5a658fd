"""A generated text corpus for the data benchmarks (`experiments.data_bench --generate_mb`):
importable without defining any entry point's flags."""

from __future__ import annotations

import json
import pathlib

import numpy as np


def generate_corpus(folder: pathlib.Path, megabytes: int, file_mb: int = 64) -> dict:
    """JSONL files of documents of random words (Zipf-distributed over a 20k-word vocabulary,
    10 to 1,000 words each), seeded: the same corpus on every machine."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    vocab = ["".join(rng.choice(letters, rng.integers(1, 10))) for _ in range(20_000)]
    ranks = np.arange(1, len(vocab) + 1)
    p = 1.0 / ranks
    p /= p.sum()
    written, files, documents = 0, 0, 0
    target = megabytes * 10**6
    while written < target:
        path = folder / f"part-{files:05d}.jsonl"
        lines, size = [], 0
        while size < min(file_mb * 10**6, target - written):
            words = rng.choice(len(vocab), rng.integers(10, 1000), p=p)
            line = json.dumps({"text": " ".join(vocab[w] for w in words) + "."}) + "\n"
            lines.append(line)
            size += len(line)
        path.write_text("".join(lines))
        written, files, documents = written + size, files + 1, documents + len(lines)
    return {"corpus": str(folder), "bytes": written, "files": files, "documents": documents}
