"""Byte-level and character-level tokenizers, saved as JSON beside a run."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from genai_jax.errors import UserError


class DataError(UserError):
    """A problem with the user's data or data config; its message names the fix."""


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """`kind="byte"`: tokens are UTF-8 bytes (vocab 256). `kind="char"`: tokens index `chars`."""

    kind: str
    chars: str = ""

    @property
    def vocab_size(self) -> int:
        return 256 if self.kind == "byte" else len(self.chars)

    @classmethod
    def from_text(cls, kind: str, text: bytes, source: str = "the data") -> Tokenizer:
        if kind == "byte":
            return cls("byte")
        if kind == "char":
            return cls("char", "".join(sorted(set(_utf8(text, source)))))
        raise DataError(f"data.tokenizer={kind!r} is not one of 'byte', 'char'")

    def encode(self, data: bytes | str, source: str = "the text") -> np.ndarray:
        """bytes or str -> int32 `[n]` token ids."""
        if self.kind == "byte":
            raw = data.encode("utf-8") if isinstance(data, str) else data
            return np.frombuffer(raw, dtype=np.uint8).astype(np.int32)
        text = data if isinstance(data, str) else _utf8(data, source)
        lookup = {c: i for i, c in enumerate(self.chars)}
        try:
            return np.fromiter((lookup[c] for c in text), dtype=np.int32, count=len(text))
        except KeyError as e:
            raise DataError(f"{source} has the character {e.args[0]!r}, which is not in this "
                            f"model's {self.vocab_size}-character vocabulary") from None

    def decode(self, tokens) -> str:
        tokens = np.asarray(tokens)
        if self.kind == "byte":
            return tokens.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
        return "".join(self.chars[int(t)] for t in tokens)

    @property
    def start_token(self) -> int:
        """Where an empty prompt starts: the end-of-document token NUL if the vocabulary has
        it (it separates documents in the training stream), else token 0."""
        return 0 if self.kind == "byte" else max(self.chars.find("\0"), 0)

    def save(self, path: str | pathlib.Path) -> None:
        pathlib.Path(path).write_text(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def load(cls, path: str | pathlib.Path) -> Tokenizer:
        return cls(**json.loads(pathlib.Path(path).read_text()))


def _utf8(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = data[e.start:e.start + 4]
        raise DataError(f"{source} is not UTF-8 text (byte {e.start}: {bad!r}); char "
                        "tokenization needs UTF-8: use data.tokenizer='byte'") from None
