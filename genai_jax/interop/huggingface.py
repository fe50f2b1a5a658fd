"""Hugging Face checkpoints in and out: GPT-2, Llama, Mistral and Qwen2.

A Hugging Face model directory is a `config.json`, the weights as `model.safetensors` (or shards
named by `model.safetensors.index.json`) and tokenizer files. Reading one gives the genai_jax
`model.*` config keys (`model_keys`) and the parameters of a `genai_jax.models.Transformer`
(`load_params`), placed straight onto a mesh one tensor at a time, so the host never holds much
more than one copy of the weights. Writing goes the other way (`export_config`,
`export_tensors`, `write_safetensors`). Every check that can fail on a user's directory raises
`ConversionError` with one line that names what is supported.

The layouts, Hugging Face -> genai_jax (kernels are `[*in, *out]`, attention kernels keep their
head axes: q `[embed, heads, head_dim]`, out `[heads, head_dim, embed]`):
- Llama, Mistral, Qwen2: `torch.nn.Linear` weights are `[out, in]` and are transposed; rotary
  embeddings use the rotate-half layout in both (no permutation of q/k rows).
- GPT-2: `Conv1D` weights are already `[in, out]`; `c_attn` holds q, k and v side by side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import mmap
import pathlib
from collections.abc import Callable, Iterator

import jax
import numpy as np
from flax import nnx

from genai_jax.errors import UserError
from genai_jax.models.transformer import Transformer, TransformerConfig

ARCHITECTURES = ("gpt2", "llama", "mistral", "qwen2")
_CLASS_NAMES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SAFETENSORS, INDEX = "model.safetensors", "model.safetensors.index.json"
IMPORT_FILE = "hf_import.json"  # in a workdir written by experiments.import_checkpoint


class ConversionError(UserError):
    """A checkpoint that cannot be converted; the message says what is supported."""


# ----------------------------------------------------------------------------------------------
# config.json <-> model.* keys


def read_config(hf_dir: str | pathlib.Path) -> dict:
    path = pathlib.Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir} has no config.json: give --hf_dir a Hugging Face model "
                              "directory (config.json, model.safetensors, tokenizer files)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not JSON ({e})") from None


def architecture(hf: dict) -> str:
    kind = hf.get("model_type")
    if kind not in ARCHITECTURES:
        raise ConversionError(f"model_type {kind!r} is not supported; genai_jax converts "
                              f"{', '.join(ARCHITECTURES)}")
    return kind


def _rope_keys(hf: dict) -> dict:
    """The rotary keys from either spelling: `rope_theta` + `rope_scaling` (most published
    checkpoints) or `rope_parameters` (what current `transformers` writes)."""
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10_000.0))
    scaling = dict(hf.get("rope_scaling") or params)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    keys = {"rope_theta": float(theta), "rope_scaling": "none"}
    if kind == "default":
        return keys
    if kind == "linear":
        return {**keys, "rope_scaling": "linear", "rope_factor": float(scaling["factor"])}
    if kind == "llama3":
        return {**keys, "rope_scaling": "llama3", "rope_factor": float(scaling["factor"]),
                "rope_low_freq_factor": float(scaling["low_freq_factor"]),
                "rope_high_freq_factor": float(scaling["high_freq_factor"]),
                "rope_original_context": int(scaling["original_max_position_embeddings"])}
    raise ConversionError(f"rope scaling {kind!r} is not supported; genai_jax converts "
                          "'default', 'linear' and 'llama3'")


def model_keys(hf: dict, block_size: int | None = None) -> dict:
    """The genai_jax `model.*` keys of a Hugging Face `config.json` (`hf`). `block_size`
    (default: the checkpoint's context) may not exceed the checkpoint's context."""
    kind = architecture(hf)
    if kind == "gpt2":
        context = hf.get("n_positions", 1024)
        act = hf.get("activation_function", "gelu_new")
        mlp = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(act)
        if mlp is None:
            raise ConversionError(f"GPT-2 activation_function {act!r} is not supported; genai_jax "
                                  "converts 'gelu_new', 'gelu_pytorch_tanh' and 'gelu'")
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise ConversionError("GPT-2 attention scaling other than 1/sqrt(head_dim) "
                                  "(scale_attn_by_inverse_layer_idx, scale_attn_weights=false) "
                                  "is not supported")
        width = hf["n_embd"]
        keys = dict(num_layers=hf["n_layer"], num_heads=hf["n_head"], num_kv_heads=0,
                    embed_dim=width, head_dim=width // hf["n_head"],
                    mlp_dim=hf.get("n_inner") or 4 * width, mlp=mlp, norm="layernorm",
                    norm_eps=hf.get("layer_norm_epsilon", 1e-5), position="learned",
                    use_bias=True, qkv_bias=False,
                    tie_embeddings=hf.get("tie_word_embeddings", True))
    else:
        context = hf.get("max_position_embeddings", 2048)
        if hf.get("hidden_act", "silu") != "silu":
            raise ConversionError(f"{kind} hidden_act {hf['hidden_act']!r} is not supported; "
                                  "genai_jax converts 'silu' (SwiGLU)")
        heads = hf["num_attention_heads"]
        keys = dict(num_layers=hf["num_hidden_layers"], num_heads=heads,
                    num_kv_heads=hf.get("num_key_value_heads") or heads,
                    embed_dim=hf["hidden_size"],
                    head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                    mlp_dim=hf["intermediate_size"], mlp="swiglu", norm="rmsnorm",
                    norm_eps=hf.get("rms_norm_eps", 1e-6), position="rotary",
                    tie_embeddings=hf.get("tie_word_embeddings", False), **_rope_keys(hf))
        if kind == "qwen2":
            keys.update(use_bias=False, qkv_bias=True)
        else:
            attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
            if attention_bias != mlp_bias:
                raise ConversionError(f"{kind} with attention_bias={attention_bias} and "
                                      f"mlp_bias={mlp_bias} is not supported (both or neither)")
            keys.update(use_bias=bool(attention_bias), qkv_bias=False)
    block_size = block_size or context
    if block_size > context:
        raise ConversionError(f"block_size {block_size} exceeds the checkpoint's context of "
                              f"{context} positions")
    window = hf.get("sliding_window")
    if kind == "qwen2" and not hf.get("use_sliding_window", False):
        window = None
    if window is not None and window < block_size:
        raise ConversionError(f"the checkpoint attends within a sliding window of {window} "
                              f"positions, shorter than the context of {block_size}; genai_jax "
                              "converts full attention only: import with --block_size="
                              f"{window} or less")
    return dict(keys, block_size=block_size, vocab_size=hf["vocab_size"], dropout=0.0)


def export_architecture(m) -> str:
    """The Hugging Face architecture the transformer of `model.*` keys `m` maps onto exactly, or
    ConversionError naming what does not map."""
    if m.position == "learned":
        if m.norm != "layernorm" or m.mlp not in ("gelu", "gelu_tanh") or m.qkv_bias or (
                m.num_kv_heads not in (0, m.num_heads)) or m.head_dim * m.num_heads not in (
                0, m.embed_dim):
            raise ConversionError("a model with learned positions exports as GPT-2, which needs "
                                  "LayerNorm, a GELU MLP, multi-head attention and head_dim x "
                                  "num_heads = embed_dim")
        return "gpt2"
    if m.norm != "rmsnorm" or m.mlp != "swiglu":
        raise ConversionError("a model with rotary positions exports as Llama or Qwen2, which "
                              "need model.norm='rmsnorm' and model.mlp='swiglu'")
    return "qwen2" if m.qkv_bias and not m.use_bias else "llama"


def export_config(cfg: TransformerConfig, kind: str, *, bos_token_id=None, eos_token_id=None,
                  dtype: str = "float32") -> dict:
    """A Hugging Face `config.json` for `cfg` as architecture `kind`."""
    common = dict(architectures=[_CLASS_NAMES[kind]], model_type=kind,
                  vocab_size=cfg.vocab_size, bos_token_id=bos_token_id,
                  eos_token_id=eos_token_id, tie_word_embeddings=cfg.tie_embeddings,
                  dtype=dtype, torch_dtype=dtype)
    if kind == "gpt2":
        return dict(common, n_positions=cfg.block_size, n_embd=cfg.embed_dim,
                    n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.mlp_dim,
                    activation_function="gelu_new" if cfg.mlp == "gelu_tanh" else "gelu",
                    layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0,
                    attn_pdrop=0.0)
    rope = {"rope_type": "default"}
    if cfg.rope_scaling == "linear":
        rope = {"rope_type": "linear", "factor": cfg.rope_factor}
    elif cfg.rope_scaling == "llama3":
        rope = {"rope_type": "llama3", "factor": cfg.rope_factor,
                "low_freq_factor": cfg.rope_low_freq_factor,
                "high_freq_factor": cfg.rope_high_freq_factor,
                "original_max_position_embeddings": cfg.rope_original_context}
    out = dict(common, hidden_size=cfg.embed_dim, intermediate_size=cfg.mlp_dim,
               num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
               num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
               max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
               rope_parameters={"rope_theta": cfg.rope_theta, **rope}, attention_dropout=0.0)
    if kind == "llama":
        out.update(attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias)
    return out


# ----------------------------------------------------------------------------------------------
# Tensor layouts


@dataclasses.dataclass(frozen=True)
class _Group:
    """Hugging Face tensors `hf` <-> genai_jax parameters `ours` (paths into the parameter
    state), converted by `to_ours(*hf arrays) -> ours` and `to_hf(*our arrays) -> hf`."""

    hf: tuple[str, ...]
    ours: tuple[tuple, ...]
    to_ours: Callable
    to_hf: Callable


def _same(hf: str, ours: tuple) -> _Group:
    return _Group((hf,), (ours,), lambda a: (a,), lambda a: (a,))


def _linear(hf: str, ours: tuple, n_in: tuple[int, ...], n_out: tuple[int, ...]) -> _Group:
    """A `torch.nn.Linear` weight `[out, in]` <-> our kernel `[*n_in, *n_out]`."""
    return _Group((hf,), (ours,), lambda w: (w.T.reshape(n_in + n_out),),
                  lambda k: (k.reshape(math.prod(n_in), math.prod(n_out)).T,))


def _reshaped(hf: str, ours: tuple, hf_shape: tuple[int, ...], our_shape: tuple[int, ...]):
    return _Group((hf,), (ours,), lambda a: (a.reshape(our_shape),),
                  lambda a: (a.reshape(hf_shape),))


def _layout(kind: str, cfg: TransformerConfig) -> list[_Group]:
    d, h, kvh, hd, f = cfg.embed_dim, cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.mlp_dim
    groups = []
    if kind == "gpt2":
        groups += [_same("transformer.wte.weight", ("embed", "embedding")),
                   _same("transformer.wpe.weight", ("pos_embed",))]
        for i in range(cfg.num_layers):
            pre, blk = f"transformer.h.{i}.", ("blocks", i)
            qkv = tuple(blk + ("attn", n) for n in "qkv")
            groups += [
                _same(pre + "ln_1.weight", blk + ("norm1", "scale")),
                _same(pre + "ln_1.bias", blk + ("norm1", "bias")),
                _Group((pre + "attn.c_attn.weight",), tuple(p + ("kernel",) for p in qkv),
                       lambda w: tuple(x.reshape(d, h, hd) for x in np.split(w, 3, axis=1)),
                       lambda *ks: (np.concatenate([k.reshape(d, d) for k in ks], axis=1),)),
                _Group((pre + "attn.c_attn.bias",), tuple(p + ("bias",) for p in qkv),
                       lambda b: tuple(x.reshape(h, hd) for x in np.split(b, 3)),
                       lambda *bs: (np.concatenate([b.reshape(d) for b in bs]),)),
                _reshaped(pre + "attn.c_proj.weight", blk + ("attn", "out", "kernel"), (d, d),
                          (h, hd, d)),
                _same(pre + "attn.c_proj.bias", blk + ("attn", "out", "bias")),
                _same(pre + "ln_2.weight", blk + ("norm2", "scale")),
                _same(pre + "ln_2.bias", blk + ("norm2", "bias")),
                _same(pre + "mlp.c_fc.weight", blk + ("mlp", "up", "kernel")),
                _same(pre + "mlp.c_fc.bias", blk + ("mlp", "up", "bias")),
                _same(pre + "mlp.c_proj.weight", blk + ("mlp", "down", "kernel")),
                _same(pre + "mlp.c_proj.bias", blk + ("mlp", "down", "bias"))]
        groups += [_same("transformer.ln_f.weight", ("norm", "scale")),
                   _same("transformer.ln_f.bias", ("norm", "bias"))]
    else:
        groups.append(_same("model.embed_tokens.weight", ("embed", "embedding")))
        for i in range(cfg.num_layers):
            pre, blk = f"model.layers.{i}.", ("blocks", i)
            attn, mlp = pre + "self_attn.", pre + "mlp."
            groups += [
                _same(pre + "input_layernorm.weight", blk + ("norm1", "scale")),
                _linear(attn + "q_proj.weight", blk + ("attn", "q", "kernel"), (d,), (h, hd)),
                _linear(attn + "k_proj.weight", blk + ("attn", "k", "kernel"), (d,), (kvh, hd)),
                _linear(attn + "v_proj.weight", blk + ("attn", "v", "kernel"), (d,), (kvh, hd)),
                _linear(attn + "o_proj.weight", blk + ("attn", "out", "kernel"), (h, hd), (d,)),
                _same(pre + "post_attention_layernorm.weight", blk + ("norm2", "scale")),
                _linear(mlp + "gate_proj.weight", blk + ("mlp", "gate", "kernel"), (d,), (f,)),
                _linear(mlp + "up_proj.weight", blk + ("mlp", "up", "kernel"), (d,), (f,)),
                _linear(mlp + "down_proj.weight", blk + ("mlp", "down", "kernel"), (f,), (d,))]
            if cfg.use_bias or cfg.qkv_bias:
                groups += [_reshaped(attn + f"{n}_proj.bias", blk + ("attn", n, "bias"),
                                     (heads * hd,), (heads, hd))
                           for n, heads in (("q", h), ("k", kvh), ("v", kvh))]
            if cfg.use_bias:
                groups += [_same(attn + "o_proj.bias", blk + ("attn", "out", "bias"))] + [
                    _same(mlp + f"{n}_proj.bias", blk + ("mlp", ours, "bias"))
                    for n, ours in (("gate", "gate"), ("up", "up"), ("down", "down"))]
        groups.append(_same("model.norm.weight", ("norm", "scale")))
    if not cfg.tie_embeddings:
        groups.append(_linear("lm_head.weight", ("head", "kernel"), (d,), (cfg.vocab_size,)))
    return groups


# ----------------------------------------------------------------------------------------------
# Reading


class TensorFiles:
    """The tensors of a Hugging Face directory by name, read one at a time from
    `model.safetensors` or the shards its index names (as numpy arrays; bfloat16 included)."""

    def __init__(self, hf_dir: str | pathlib.Path):
        self.dir = pathlib.Path(hf_dir)
        index = self.dir / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        elif (self.dir / SAFETENSORS).is_file():
            weight_map = None
        else:
            raise ConversionError(f"{self.dir} has neither {SAFETENSORS} nor {INDEX} (genai_jax "
                                  "reads safetensors weights)")
        files = sorted(set(weight_map.values())) if weight_map else [SAFETENSORS]
        missing = [f for f in files if not (self.dir / f).is_file()]
        if missing:
            raise ConversionError(f"{self.dir} lacks the weight file(s) {', '.join(missing[:3])} "
                                  f"named by {INDEX}")
        if weight_map is None:
            with self._open(SAFETENSORS) as f:
                weight_map = dict.fromkeys(f.keys(), SAFETENSORS)
        self._where = weight_map

    def _open(self, file: str):
        """A file opened for one read: safetensors maps the whole file, and the pages read stay
        in this process's memory until it is closed."""
        from safetensors import safe_open

        # The "flax" reader, on the host, because numpy has no bfloat16 of its own.
        return safe_open(str(self.dir / file), framework="flax")

    def names(self) -> set[str]:
        return set(self._where)

    def resolve(self, name: str) -> str | None:
        """`name`, or its spelling without the `transformer.` prefix (GPT-2 checkpoints saved
        from the base model, like OpenAI's own), if the files hold it."""
        for candidate in (name, name.removeprefix("transformer.")):
            if candidate in self._where:
                return candidate
        return None

    def _found(self, name: str) -> str:
        found = self.resolve(name)
        if found is None:
            raise ConversionError(f"the weights in {self.dir} have no tensor {name!r}")
        return found

    @contextlib.contextmanager
    def _reading(self, found: str):
        """The file holding tensor `found`, opened for one read, its arrays made on the host."""
        with jax.default_device(jax.local_devices(backend="cpu")[0]), \
                self._open(self._where[found]) as f:
            yield f

    def get(self, name: str) -> np.ndarray:
        found = self._found(name)
        with self._reading(found) as f:
            return np.asarray(f.get_tensor(found))

    def shape(self, name: str) -> tuple[int, ...]:
        found = self._found(name)
        with self._reading(found) as f:
            return tuple(f.get_slice(found).get_shape())

    def read_into(self, name: str, out: np.ndarray, block_bytes: int = 4 * 2**20) -> None:
        """Read tensor `name` into `out` (an array, or a strided view, of its shape; cast to
        its dtype) a block of rows at a time, the file open for one block only: the host holds
        one block beyond `out`."""
        found = self._found(name)
        rows = max(1, block_bytes // max(1, out[:1].nbytes))
        for start in range(0, out.shape[0], rows):
            stop = min(start + rows, out.shape[0])
            with self._reading(found) as f:
                out[start:stop] = np.asarray(f.get_slice(found)[start:stop])


def _flat_paths(tree) -> dict[tuple, object]:
    """`{path: leaf}` of a parameter state, paths as tuples of names and layer indices."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out[tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))] = leaf
    return out


def _from_paths(tree, values: dict[tuple, object]):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: values[tuple(k.key for k in path
                                    if isinstance(k, jax.tree_util.DictKey))], tree)


def abstract_params(cfg: TransformerConfig):
    return nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)


def _shape_error(hf_dir, name: str, shape, path: tuple, wanted) -> ConversionError:
    return ConversionError(
        f"tensor {name!r} in {hf_dir} has shape {tuple(shape)}, which does not give "
        f"{'.'.join(map(str, path))} of shape {tuple(wanted)} as config.json implies")


def _mapped_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A zero array in its own anonymous memory map: page-aligned, so a CPU device adopts it
    without a copy, and outside malloc's heap, which the reading blocks would fragment."""
    nbytes = math.prod(shape) * dtype.itemsize
    pages = mmap.mmap(-1, max(1, nbytes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(pages, dtype, math.prod(shape)).reshape(shape)


def _place(value: np.ndarray, sharding) -> jax.Array:
    """`value` on `sharding` (None: the default device). On one device it may be adopted
    as it is (CPU, aligned); over several, each device copies its shard."""
    if sharding is None or len(sharding.device_set) == 1:
        return jax.device_put(value, sharding, may_alias=True)
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def load_params(hf_dir: str | pathlib.Path, cfg: TransformerConfig, shardings=None):
    """The parameters of the Hugging Face checkpoint in `hf_dir` for a transformer `cfg` (from
    `model_keys` of its config), each cast to `cfg.param_dtype` and placed by `shardings` (a
    tree like the parameter state whose leaves are `jax.sharding.Sharding`s; None: the default
    device) as soon as it is read. A tensor that is one parameter is read a block at a time
    into the parameter's own buffer, which a CPU device adopts: the host then holds one block
    beyond the weights (others, e.g. GPT-2's fused q/k/v, one tensor and its conversion)."""
    kind = architecture(read_config(hf_dir))
    files = TensorFiles(hf_dir)
    abstract = _flat_paths(abstract_params(cfg))
    where = _flat_paths(shardings) if shardings is not None else {}
    dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
    values = {}
    for group in _layout(kind, cfg):
        if len(group.hf) == len(group.ours) == 1:
            # One tensor to one parameter: read straight into the parameter's buffer (through
            # the inverse conversion's view of it), which the device then takes without a copy.
            path = group.ours[0]
            out = _mapped_empty(abstract[path].shape, dtype)
            (view,) = group.to_hf(out)
            assert np.shares_memory(view, out), group.hf  # a conversion that copies: not here
            shape = files.shape(group.hf[0])
            if shape != view.shape:
                raise _shape_error(hf_dir, group.hf[0], shape, path, out.shape)
            files.read_into(group.hf[0], view)
            values[path] = _place(out, where.get(path))
            del out, view
            continue
        tensors = [files.get(n) for n in group.hf]
        wanted = [tuple(abstract[path].shape) for path in group.ours]
        try:
            converted = group.to_ours(*tensors)
        except ValueError:  # a reshape that cannot be: the tensor has another size
            converted = None
        if converted is None or [v.shape for v in converted] != wanted:
            raise _shape_error(hf_dir, group.hf[0], tensors[0].shape, group.ours[0], wanted[0])
        for path, value in zip(group.ours, converted, strict=True):
            values[path] = _place(value.astype(dtype, copy=False), where.get(path))
            del value
        del converted, tensors
    missing = set(abstract) - set(values)
    if missing:  # a layout that forgets a parameter is a bug here, not the user's
        raise AssertionError(f"no Hugging Face tensor for {sorted(missing)[:3]}")
    return _from_paths(abstract_params(cfg), values)


# ----------------------------------------------------------------------------------------------
# Writing


def export_tensors(params, cfg: TransformerConfig, kind: str) -> Iterator[tuple[str, np.ndarray]]:
    """`(name, array)` of the Hugging Face checkpoint of `params` as architecture `kind`, one
    group at a time (parameters fetched whole to this host). A bias the model does not have
    (e.g. GPT-2 exported from a bias-free model) is written as zeros: the same function."""
    from genai_jax.parallel import fetch

    flat = _flat_paths(params)
    zeros_like = _flat_paths(abstract_params(dataclasses.replace(cfg, use_bias=True)))
    for group in _layout(kind, dataclasses.replace(cfg, use_bias=True) if kind == "gpt2"
                         else cfg):
        ours = [np.asarray(fetch(flat[p])) if p in flat else
                np.zeros(zeros_like[p].shape, np.dtype(jax.numpy.dtype(cfg.param_dtype)))
                for p in group.ours]
        yield from zip(group.hf, group.to_hf(*ours), strict=True)


def write_safetensors(tensors: Iterator[tuple[str, np.ndarray]], hf_dir: str | pathlib.Path,
                      max_shard_bytes: int = 2 * 1024 ** 3, name: str = SAFETENSORS
                      ) -> list[str]:
    """Write `tensors` as `name` (`model.safetensors`), or as shards with
    `model.safetensors.index.json` when they exceed `max_shard_bytes`; returns the files
    written."""
    from safetensors.flax import save_file

    hf_dir = pathlib.Path(hf_dir)
    hf_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = total = 0
    for key, array in tensors:
        array = np.ascontiguousarray(array)
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = array
        size += array.nbytes
        total += array.nbytes
    names = ([name] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        for file, shard in zip(names, shards, strict=True):
            save_file({k: jax.numpy.asarray(v) for k, v in shard.items()}, str(hf_dir / file),
                      metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {k: file for file, shard in zip(names, shards, strict=True) for k in shard}
        (hf_dir / INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return names


# Where each adaptable projection lives in a Llama-family checkpoint (PEFT names it so).
_PEFT_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                 "out": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                 "down": "mlp.down_proj"}
# PEFT's names of the modules a LoRA run may train whole (`model.lora.modules_to_save`).
_PEFT_SAVED = {"embed": "embed_tokens", "head": "lm_head"}
_MODULE_OF = {"q": "attn", "k": "attn", "v": "attn", "out": "attn", "gate": "mlp", "up": "mlp",
              "down": "mlp"}


def export_adapter(adapters, cfg: TransformerConfig, kind: str
                   ) -> tuple[dict, Iterator[tuple[str, np.ndarray]]]:
    """A PEFT LoRA adapter of a LoRA run: `(adapter_config.json dict, (name, array) ...)` for
    `peft.PeftModel.from_pretrained` on the Hugging Face base model. PEFT's `lora_A.weight` is
    our `lora_a` transposed (`[rank, in]`), `lora_B.weight` our `lora_b` transposed, both
    over the flattened Hugging Face axes; its scale is ours, alpha / rank. Whole modules the
    run trained beside the adapters (`model.lora.modules_to_save`: the embedding, the head) are
    PEFT's `modules_to_save`, written in the checkpoint's layout. GPT-2, whose q, k and v share
    one `c_attn` matrix, has no exact PEFT form of separate adapters: refused."""
    from genai_jax.parallel import fetch

    if cfg.lora is None:
        raise ConversionError("--adapter_only needs a LoRA run (model.lora.rank > 0)")
    if kind == "gpt2":
        raise ConversionError("PEFT adapters of GPT-2 are not supported (its q, k and v share one "
                              "c_attn matrix); export the merged model without --adapter_only")
    flat = _flat_paths(adapters)
    saved = [m for m in ("embed", "head") if any(path[0] == m for path in flat)]
    # A trained embedding that is also the head (tied): PEFT wraps both and ties them again.
    tied = cfg.tie_embeddings and "embed" in saved
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora.rank,
              "lora_alpha": cfg.lora.alpha, "lora_dropout": cfg.lora.dropout,
              "target_modules": sorted(_PEFT_MODULES[t].split(".")[1] for t in cfg.lora_targets),
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "inference_mode": True, "init_lora_weights": True,
              "modules_to_save": [_PEFT_SAVED[m] for m in saved + ["head"] * tied] or None,
              "ensure_weight_tying": tied}

    def tensors():
        for group in _layout(kind, cfg):
            if group.ours[0][0] in saved:
                ours = [np.asarray(fetch(flat[path])) for path in group.ours]
                for name, value in zip(group.hf, group.to_hf(*ours), strict=True):
                    yield f"base_model.model.{name}", value
                    if tied and group.ours[0][0] == "embed":
                        yield "base_model.model.lm_head.weight", value
        for i in range(cfg.num_layers):
            for target in cfg.lora_targets:
                ours = ("blocks", i, _MODULE_OF[target], target)
                name = f"base_model.model.model.layers.{i}.{_PEFT_MODULES[target]}"
                yield f"{name}.lora_A.weight", np.asarray(fetch(flat[ours + ("lora_a",)])).T
                yield f"{name}.lora_B.weight", np.asarray(fetch(flat[ours + ("lora_b",)])).T

    return config, tensors()


def save_tokenizer(tokenizer, hf_dir: str | pathlib.Path) -> None:
    """Write `tokenizer`'s Hugging Face files into `hf_dir`. A Hugging Face-format tokenizer is
    saved as it is; genai_jax's byte and char tokenizers become the same mapping in the
    `tokenizers` format: a BPE without merges over the 256 byte symbols (byte-level, ids = byte
    values) or over the characters (ids = their index), so that ids agree both ways."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if tokenizer.kind not in ("byte", "char"):
        tokenizer.save(pathlib.Path(hf_dir))
        return
    if tokenizer.kind == "byte":
        table = _byte_symbols()
        assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
        hf_tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
        hf_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf_tok.decoder = decoders.ByteLevel()
    else:
        hf_tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(tokenizer.chars)},
                                      merges=[]))
        hf_tok.decoder = decoders.Fuse()
    hf_dir = pathlib.Path(hf_dir)
    hf_tok.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30}) + "\n")


def _byte_symbols() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what byte-level BPE vocabularies,
    `tokenizers`' `ByteLevel` included, spell bytes with)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# ----------------------------------------------------------------------------------------------
# The entry point for tests and outside checks


def transformer_config(hf_dir: str | pathlib.Path, *, block_size: int | None = None,
                       param_dtype: str = "float32", dtype: str = "float32") -> TransformerConfig:
    keys = model_keys(read_config(hf_dir), block_size)
    return TransformerConfig(**keys, param_dtype=param_dtype, dtype=dtype)


def logits_fn(hf_dir: str | pathlib.Path) -> Callable[[np.ndarray], np.ndarray]:
    """A function from int32 tokens `[batch, length]` to the float32 logits
    `[batch, length, vocab]` of the Hugging Face checkpoint in `hf_dir` run by genai_jax's
    transformer in float32 (numpy in, numpy out; compiled once per shape)."""
    cfg = transformer_config(hf_dir)
    params = load_params(hf_dir, cfg)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))

    @jax.jit
    def forward(params, tokens):
        return nnx.merge(graphdef, params)(tokens)[0]

    def logits(tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens, np.int32)
        if tokens.ndim != 2 or tokens.shape[1] > cfg.block_size:
            raise ValueError(f"tokens must be [batch, length <= {cfg.block_size}], got "
                             f"{tokens.shape}")
        return np.asarray(forward(params, tokens), np.float32)

    return logits
