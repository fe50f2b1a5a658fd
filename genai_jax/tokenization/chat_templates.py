"""Chat templates: the Jinja programs a Hugging Face tokenizer ships to turn a conversation into
the text its chat model was trained on, rendered as `transformers` renders them.

A template from the Hub is untrusted code, so it runs in Jinja's immutable sandbox, with the
environment `transformers` gives it (block trimming, loop controls, `raise_exception`,
`strftime_now`, a `tojson` that leaves non-ASCII and HTML characters alone, the `generation`
tag): the same template and messages give the same text here as there, without importing
`transformers` at run time.
"""

from __future__ import annotations

import datetime
import functools
import json

import jinja2
import jinja2.ext
import jinja2.sandbox

from genai_jax.errors import UserError


class ChatTemplateError(UserError):
    """A chat template that does not compile, or that refuses a conversation."""


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = False,
                **variables) -> str:
    """The text of `messages` (`[{"role": ..., "content": ...}, ...]`) under `template`.

    `add_generation_prompt`: end with the header that opens the assistant's next turn.
    `variables`: what else the template reads (the special token strings `bos_token`,
    `eos_token`, ..., `tools`, `documents`, model-specific switches).
    """
    # As transformers does: keys whose value is None are left out, so `is defined` tests agree.
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    context = {"tools": None, "documents": None, **variables}
    try:
        return _compile(template).render(messages=messages,
                                         add_generation_prompt=add_generation_prompt, **context)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template refused the conversation: {e}") from None


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which a prompt must not see.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` without underscore names, which could reach Python internals."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r}: names "
                                                  "starting with '_' are not allowed")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's tokens for training
    masks in transformers; rendering text, it is its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       namespace=_Namespace, dict=lambda *a, **k: dict(*a, **k))
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not compile (line {e.lineno}: "
                                f"{e.message}): fix chat_template in tokenizer_config.json or "
                                "chat_template.jinja") from None
