"""OpenAI's wire format: request bodies checked and read into `engine.Settings`, responses and
stream chunks built from the engine's `Update`s, errors as `{"error": {...}}` with 4xx codes.

Parameters follow OpenAI's API (defaults: temperature 1, top_p 1, n 1; completions'
max_tokens 16, chat's the rest of the context), plus `top_k` and `ignore_eos` as vLLM has them.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

from genai_jax.errors import UserError
from genai_jax.serving.engine import MAX_CHOICES, Settings, Update

MAX_STOP = 4
MAX_COMPLETION_LOGPROBS = 5
MAX_TOP_LOGPROBS = 20
# accepted at their neutral value (harnesses send them); anything else is refused
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "best_of": 1, "suffix": None,
           "logit_bias": None, "user": None, "repetition_penalty": 1}


class APIError(Exception):
    """An answer with an HTTP error status and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (status, message, param,
                                                                       code, kind)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def _invalid(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


def field(body: dict, name: str, kind, default=None, *, low=None, high=None):
    """`body[name]` checked against `kind` (a type or tuple) and the closed range [low, high]."""
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in (
        kind if isinstance(kind, tuple) else (kind,)))
    if not ok:
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise _invalid(name, f"expected {names}, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise _invalid(name, f"{value} is outside [{low}, {high}]")
    return value


@dataclasses.dataclass
class Parsed:
    """A checked request: its prompts (token ids) and how to generate."""

    prompts: list[list[int]]
    settings: Settings
    stream: bool
    include_usage: bool
    texts: list[str | None] | None = None  # the prompts as sent, where text (for echo)


def check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if model is None:
        raise _invalid("model", "missing required parameter")
    if model != served:
        raise APIError(404, f"The model {model!r} does not exist: this server serves "
                       f"{served!r}", param="model", code="model_not_found")


def _settings(body: dict, max_tokens_default: int, logprobs: int | None) -> Settings:
    for name, neutral in NEUTRAL.items():
        if body.get(name, neutral) not in (neutral, None):
            raise _invalid(name, f"not supported (only {neutral!r})")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP
                             or not all(isinstance(s, str) and s for s in stop)):
        raise _invalid("stop", f"a string or a list of up to {MAX_STOP} non-empty strings")
    top_k = field(body, "top_k", int, 0, low=-1)  # vLLM's -1: off, like 0
    max_tokens = field(body, "max_tokens", int, None, low=0)
    if max_tokens is None:  # chat's newer name
        max_tokens = field(body, "max_completion_tokens", int, max_tokens_default, low=0)
    return Settings(
        max_tokens=max_tokens,
        temperature=float(field(body, "temperature", (int, float), 1.0, low=0, high=2)),
        top_p=float(field(body, "top_p", (int, float), 1.0, low=0, high=1)) or 1e-9,
        top_k=max(top_k, 0), seed=field(body, "seed", int), stop=tuple(stop or ()),
        n=field(body, "n", int, 1, low=1, high=MAX_CHOICES), logprobs=logprobs,
        echo=field(body, "echo", bool, False), ignore_eos=field(body, "ignore_eos", bool, False))


def _stream(body: dict) -> tuple[bool, bool]:
    stream = field(body, "stream", bool, False)
    options = field(body, "stream_options", dict, {})
    return stream, bool(options.get("include_usage", False))


def parse_completion(body: dict, encode, vocab_size: int, block_size: int) -> Parsed:
    """POST /v1/completions: `prompt` a string, token ids, or a list of either."""
    prompt = body.get("prompt")
    if prompt is None:
        raise _invalid("prompt", "missing required parameter")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                   and all(isinstance(t, int) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(
            isinstance(p, str) or (isinstance(p, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in p)) for p in prompt):
        raise _invalid("prompt", "a string, a list of token ids, or a list of either")
    prompts = []
    for p in prompt:
        ids = list(encode(p)) if isinstance(p, str) else list(p)
        if not ids or any(not 0 <= t < vocab_size for t in ids):
            raise _invalid("prompt", f"token ids must be in [0, {vocab_size}), at least one")
        prompts.append(ids)
    logprobs = field(body, "logprobs", int, None, low=0, high=MAX_COMPLETION_LOGPROBS)
    settings = _settings(body, 16, logprobs)
    _check_context(prompts, settings, block_size)
    texts = [p if isinstance(p, str) else None for p in prompt]
    return Parsed(prompts, settings, *_stream(body), texts=texts)


def parse_chat(body: dict, render, block_size: int) -> Parsed:
    """POST /v1/chat/completions: `messages` rendered by the tokenizer's chat template."""
    messages = body.get("messages")
    if messages is None:
        raise _invalid("messages", "missing required parameter")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages):
        raise _invalid("messages", "a non-empty list of {role, content} objects with string "
                       "content")
    try:
        ids = list(render(messages))
    except UserError as e:
        raise _invalid("messages", str(e)) from None
    if body.get("echo"):
        raise _invalid("echo", "not a chat completions parameter")
    top = field(body, "top_logprobs", int, None, low=0, high=MAX_TOP_LOGPROBS)
    logprobs = (top or 0) if field(body, "logprobs", bool, False) else None
    settings = _settings(body, max(block_size - len(ids), 0), logprobs)
    _check_context([ids], settings, block_size)
    return Parsed([ids], settings, *_stream(body))


def _check_context(prompts: list[list[int]], settings: Settings, block_size: int) -> None:
    longest = max(len(p) for p in prompts)
    if longest + settings.max_tokens > block_size:
        raise APIError(400, f"This model's maximum context length is {block_size} tokens; "
                       f"the prompt has {longest} and max_tokens asks for "
                       f"{settings.max_tokens} more", param="max_tokens",
                       code="context_length_exceeded")


# ---------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@dataclasses.dataclass
class Choice:
    """One choice collected from the engine's updates."""

    text: str = ""
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None

    def add(self, update: Update) -> None:
        self.text += update.text
        self.tokens += update.tokens
        self.logprobs += update.logprobs
        self.finish_reason = update.finish_reason or self.finish_reason


def completion_logprobs(entries: list[dict | None], token_text, offset: int = 0) -> dict:
    """OpenAI's completions `logprobs` object (`tokens`, `token_logprobs`, `top_logprobs`,
    `text_offset`); a None entry is the prompt's first token, which has no log-probability."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                 "text_offset": []}
    for e in entries:
        text = token_text(e["token"])
        out["tokens"].append(text)
        out["token_logprobs"].append(e["logprob"])
        out["top_logprobs"].append(
            None if e["logprob"] is None else {token_text(t): x for t, x in e["top"]})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(entries: list[dict], token_text) -> dict:
    def item(token, logprob):
        text = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
    return {"content": [{**item(e["token"], e["logprob"]),
                         "top_logprobs": [item(t, x) for t, x in e["top"]]} for e in entries]}


def usage(prompts: list[list[int]], completion_tokens: int) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: str, rid: str, model: str, choices: list[dict], **extra) -> dict:
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model,
            "choices": choices, **extra}
