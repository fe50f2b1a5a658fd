"""Hugging Face checkpoints in and out (`genai_jax.interop.huggingface`,
`experiments.import_checkpoint`, `experiments.export_checkpoint`), checked against
`transformers` itself on small random models of each supported architecture."""

from __future__ import annotations

import functools
import pathlib

import jax
import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch")

from flax import nnx  # noqa: E402

from genai_jax.interop import huggingface as hf  # noqa: E402
from genai_jax.models.lm import _apply  # noqa: E402
from genai_jax.models.transformer import Transformer, init_cache  # noqa: E402
from genai_jax.sampling.decode import generate  # noqa: E402
from tests.hf_models import VOCAB, make_model, save_tokenizer, torch_logits  # noqa: E402

KINDS = ("gpt2", "llama", "mistral", "qwen2")


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict:
    """{kind: (directory, torch model)}, each directory with a tokenizer too."""
    out = {}
    for kind in KINDS:
        directory = tmp_path_factory.mktemp(kind)
        out[kind] = directory, make_model(kind, directory)
        save_tokenizer(directory)
    return out


def tolerance(reference: np.ndarray) -> float:
    return 1e-4 * max(1.0, float(np.abs(reference).max()))


def tokens(batch=2, length=40, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, VOCAB, (batch, length)).astype(np.int32)


@functools.cache
def loaded(directory: pathlib.Path):
    cfg = hf.transformer_config(directory)
    params = hf.load_params(directory, cfg)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    return cfg, params, functools.partial(_apply, graphdef)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_equal_transformers(hf_models, kind):
    directory, model = hf_models[kind]
    x = tokens()
    ref = torch_logits(model, x)
    ours = hf.logits_fn(directory)(x)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=tolerance(ref), rtol=0)
    # The check has teeth: the logits are O(1) apart from those of another random model.
    assert np.abs(ours - torch_logits(make_model(kind, directory.parent / "other", seed=1),
                                      x)).max() > 100 * tolerance(ref)


@pytest.mark.parametrize("kind", KINDS)
def test_kv_cache_logits_equal_transformers(hf_models, kind):
    """A 24-token prefill into the cache, then 8 single-token steps: each position's logits
    are those of the full forward pass of `transformers`."""
    directory, model = hf_models[kind]
    cfg, params, apply = loaded(directory)
    x = tokens(length=32, seed=1)
    ref = torch_logits(model, x)
    cache = init_cache(cfg, 2, 32)
    pos = np.broadcast_to(np.arange(32), x.shape)
    step = jax.jit(apply)
    out, cache = step(params, x[:, :24], pos[:, :24], cache)
    chunks = [np.asarray(out)]
    for t in range(24, 32):
        out, cache = step(params, x[:, t:t + 1], pos[:, t:t + 1], cache)
        chunks.append(np.asarray(out))
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), ref, atol=tolerance(ref), rtol=0)


def until_eos(row, eos: int) -> list[int]:
    row = [int(t) for t in row]
    return row[:row.index(eos) + 1] if eos in row else row


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_equals_transformers_generate(hf_models, kind):
    import torch

    directory, model = hf_models[kind]
    cfg, params, apply = loaded(directory)
    prompt = tokens(batch=1, length=8, seed=2)
    with torch.no_grad():
        ref = model.generate(torch.as_tensor(prompt, dtype=torch.long), max_new_tokens=32,
                             do_sample=False, eos_token_id=2, pad_token_id=2)[0, 8:].numpy()
    ours = generate(apply, functools.partial(init_cache, cfg), params, list(prompt), 32,
                    jax.random.PRNGKey(0), block_size=cfg.block_size, temperature=0.0)[0]
    assert until_eos(ours, 2) == until_eos(ref, 2)
