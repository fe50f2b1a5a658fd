"""The transformer and its attention: variants, logical axes, KV-cache decoding; the layers'
convolution with its hand-written backward pass."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genai_jax.models.transformer import Transformer, TransformerConfig, init_cache
from genai_jax.nn import dot_product_attention
from genai_jax.nn.layers import conv2d
from genai_jax.parallel import logical_axes
from genai_jax.sampling.decode import generate, sample_logits

BASE = dict(vocab_size=50, block_size=16, num_layers=2, num_heads=4, embed_dim=32)


def _model(**kw):
    return Transformer(TransformerConfig(**{**BASE, **kw}), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_xla_attention_matches_jax_reference(causal, kv_heads):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(kq, (2, 7, 4, 8))
    k = jax.random.normal(kk, (2, 7, kv_heads, 8))
    v = jax.random.normal(kv, (2, 7, kv_heads, 8))
    ours = dot_product_attention(q, k, v, causal=causal)
    ref = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_xla_attention_gradients_match_autodiff_of_the_reference(packed):
    """The custom tangent (flash attention's backward as its transpose) and the causal query
    blocks (at 256 positions: 4 blocks) against autodiff of `jax.nn.dot_product_attention`, in
    reverse and forward mode; float32 rounding only (measured <= 2e-6)."""
    from genai_jax.nn.attention import _num_query_blocks

    assert _num_query_blocks(256, 256, True) == 4  # the blocked path is the one tested
    q, k, v, w = (jax.random.normal(key, shape) for key, shape in zip(
        jax.random.split(jax.random.PRNGKey(2), 4),
        [(2, 256, 4, 8), (2, 256, 2, 8), (2, 256, 2, 8), (2, 256, 4, 8)], strict=True))
    seg = jnp.repeat(jnp.array([[0, 1], [0, 0]]), 128, axis=1) if packed else None
    mask = None if seg is None else (seg[:, :, None] == seg[:, None, :])[:, None]

    def loss(attention):
        return lambda q, k, v: jnp.sum(attention(q, k, v) * w)

    ours = loss(lambda q, k, v: dot_product_attention(q, k, v, causal=True, segment_ids=seg))
    ref = loss(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=True, implementation="xla"))
    for got, want in zip(jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(ref, (0, 1, 2))(q, k, v),
                         strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    tangents = (w, k[:, :, ::-1], v * 0.5)
    np.testing.assert_allclose(jax.jvp(ours, (q, k, v), tangents)[1],
                               jax.jvp(ref, (q, k, v), tangents)[1], rtol=2e-5)


def test_rotary_table_equals_rotary_of_positions():
    from genai_jax.nn import rotary

    x = jax.random.normal(jax.random.PRNGKey(3), (2, 64, 3, 16))
    positions = jnp.broadcast_to(jnp.arange(64), (2, 64))
    np.testing.assert_allclose(rotary(x, None), rotary(x, positions), atol=2e-6)


def test_segment_ids_block_attention_across_documents():
    q = k = v = jax.random.normal(jax.random.PRNGKey(1), (1, 6, 2, 4))
    seg = jnp.array([[0, 0, 0, 1, 1, 1]])
    packed = dot_product_attention(q, k, v, causal=True, segment_ids=seg)
    alone = dot_product_attention(q[:, 3:], k[:, 3:], v[:, 3:], causal=True)
    np.testing.assert_allclose(packed[:, 3:], alone, atol=1e-6)


def test_unknown_attention_implementation_is_rejected():
    q = jnp.zeros((1, 2, 1, 4))
    with pytest.raises(ValueError, match="not one of"):
        dot_product_attention(q, q, q, implementation="flash9000")


@pytest.mark.parametrize("variant", [
    {},
    {"norm": "rmsnorm", "position": "rotary", "mlp": "swiglu", "use_bias": False},
    {"num_kv_heads": 2, "tie_embeddings": False, "dropout": 0.1},
])
def test_transformer_variants_forward(variant):
    model = _model(**variant)
    tokens = jnp.arange(24).reshape(2, 12) % 50
    logits, cache = model(tokens)
    assert logits.shape == (2, 12, 50) and logits.dtype == jnp.float32 and cache is None
    assert bool(jnp.all(jnp.isfinite(logits)))
    # causal: changing a later token never changes earlier logits
    changed, _ = model(tokens.at[:, 8].set(3))
    np.testing.assert_allclose(changed[:, :8], logits[:, :8], atol=1e-5)
    if variant.get("dropout"):
        a, _ = model(tokens, rng=jax.random.PRNGKey(0))
        assert not np.allclose(a, logits)


def test_bf16_compute_over_fp32_params():
    model = _model(dtype="bfloat16")
    params = nnx.state(model, nnx.Param)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    logits, _ = model(jnp.zeros((1, 8), jnp.int32))
    ref, _ = _model()(jnp.zeros((1, 8), jnp.int32))
    assert bool(jnp.all(jnp.isfinite(logits)))
    np.testing.assert_allclose(logits, ref, atol=0.05)  # bf16 has ~3 significant digits


def test_every_parameter_has_logical_axes():
    params = nnx.state(_model(num_kv_heads=2, tie_embeddings=False), nnx.Param)
    axes = jax.tree.leaves(logical_axes(params), is_leaf=lambda x: isinstance(x, tuple))
    shapes = jax.tree.leaves(params)
    assert len(axes) == len(shapes)
    for names, x in zip(axes, shapes, strict=True):
        assert isinstance(names, tuple) and len(names) == x.ndim, (names, x.shape)
    assert {"embed", "mlp", "heads", "kv", "vocab"} <= {n for a in axes for n in a}


def _apply(graphdef, params, tokens, positions, cache):
    return nnx.merge(graphdef, params)(tokens, positions=positions, cache=cache)


@pytest.mark.parametrize("variant", [{}, {"position": "rotary", "num_kv_heads": 2}])
def test_greedy_decoding_with_cache_equals_without(variant):
    cfg = TransformerConfig(**{**BASE, **variant})
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(3)), nnx.Param)
    prompts = [np.array([1, 2, 3, 4, 5]), np.array([7, 8])]  # different lengths, one batch
    new = 9
    cached = generate(functools.partial(_apply, graphdef), functools.partial(init_cache, cfg),
                      params, prompts, new, jax.random.PRNGKey(0), block_size=cfg.block_size,
                      temperature=0.0)
    # No cache: rerun the whole sequence for every token. Causal attention lets us pad it to
    # the block size (one compilation) and read the logits at the last real position.
    full = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])
    for prompt, got in zip(prompts, cached, strict=True):
        seq = list(prompt)
        for _ in range(new):
            padded = jnp.zeros((1, cfg.block_size), jnp.int32).at[0, :len(seq)].set(seq)
            seq.append(int(jnp.argmax(full(params, padded)[0, len(seq) - 1])))
        np.testing.assert_array_equal(got, seq[len(prompt):])


def test_generation_beyond_the_block_size_shifts_the_context():
    cfg = TransformerConfig(**BASE)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(3)), nnx.Param)
    out = generate(functools.partial(_apply, graphdef), functools.partial(init_cache, cfg),
                   params, [np.array([1, 2, 3])], 40, jax.random.PRNGKey(0),
                   block_size=cfg.block_size, temperature=1.0)
    assert out[0].shape == (40,) and out[0].min() >= 0 and out[0].max() < cfg.vocab_size


def test_top_k_and_top_p_restrict_the_support():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 200)
    draw = lambda **kw: {int(sample_logits(logits, k, **kw)[0]) for k in keys}
    assert draw(top_k=2) == {0, 1}
    assert draw(top_p=0.7) == {0, 1}  # 0.5 < 0.7 needs the second token, not the third
    assert draw(temperature=0.0) == {0}
    assert draw() == {0, 1, 2, 3}


def test_custom_matmul_gradient_and_gelu_equal_the_plain_ones():
    from genai_jax.nn.layers import gelu, matmul

    kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x, w = jax.random.normal(kx, (6, 5)), jax.random.normal(kw, (5, 3))
    dy = jax.random.normal(kg, (6, 3))
    ours = jax.vjp(matmul, x, w)[1](dy)
    plain = jax.vjp(jnp.matmul, x, w)[1](dy)
    for a, b in zip(ours, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    z = jnp.linspace(-6, 6, 101)
    np.testing.assert_allclose(gelu(z), jax.nn.gelu(z, approximate=False), atol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda t: gelu(t).sum())(z),
                               jax.grad(lambda t: jax.nn.gelu(t, approximate=False).sum())(z),
                               atol=1e-5)


@pytest.mark.parametrize("size,c_in,c_out,k,stride", [
    (8, 1, 4, 4, 2), (7, 3, 5, 3, 1), (9, 2, 3, 4, 2)])
def test_conv2d_gradients_equal_autodiff(size, c_in, c_out, k, stride):
    x = jax.random.normal(jax.random.PRNGKey(0), (3, size, size, c_in))
    w = jax.random.normal(jax.random.PRNGKey(1), (k, k, c_in, c_out))
    reference = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
    np.testing.assert_allclose(conv2d(x, w, stride), reference(x, w), rtol=1e-5, atol=1e-5)
    ours = jax.grad(loss(lambda x, w: conv2d(x, w, stride)), argnums=(0, 1))(x, w)
    theirs = jax.grad(loss(reference), argnums=(0, 1))(x, w)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # A gradient of the input gradient (what R1 regularisation differentiates) also agrees.
    r1 = lambda f: lambda w: jnp.sum(jnp.square(jax.grad(loss(f))(x, w)))
    np.testing.assert_allclose(jax.grad(r1(lambda x, w: conv2d(x, w, stride)))(w),
                               jax.grad(r1(reference))(w), rtol=1e-3, atol=1e-3)
