"""Fine-tuning: starting from another run (`init_from`), LoRA, instruction data packed with
segment ids and a completion-only loss."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genai_jax.config_checks import ConfigError
from genai_jax.data.instructions import load_instructions, new_tokenizer, pack, read_jsonl
from genai_jax.models.transformer import Transformer, TransformerConfig
from genai_jax.tokenization.tokenizers import DataError, Tokenizer
from genai_jax.train import train
from tests.conftest import tiny_lm_config

ROTARY = {"model.position": "rotary", "model.norm": "rmsnorm", "model.mlp": "swiglu",
          "model.use_bias": False}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, text_file):
    """A tiny Llama-style model trained for 10 steps: what the fine-tuning runs start from."""
    workdir = tmp_path_factory.mktemp("base")
    config = tiny_lm_config(**{"data.path": str(text_file), "train.steps": 10, **ROTARY})
    return workdir, train(config, workdir, progress=False)


def finetune_config(text_file, base_dir, **overrides):
    """The tiny config with the model keys left at their defaults: inherited from the base."""
    from genai_jax.config import base_config
    from tests.conftest import overridden

    c = base_config()
    c.data.update(name="text_file", path=str(text_file))
    c.train.update(steps=10, batch_size=4, warmup_steps=2, log_every=5, learning_rate=1e-2)
    c.eval.update(every=10, steps=2)
    c.checkpoint.update(every=10, keep=2)
    c.sample.update(max_new_tokens=8)
    c.init_from = str(base_dir)
    return overridden(c, overrides)


def losses(workdir) -> list[float]:
    return [r["train/loss"] for r in map(json.loads, (workdir / "metrics.jsonl").open())
            if "train/loss" in r]


def test_init_from_inherits_the_model_and_starts_from_its_weights(base_run, text_file,
                                                                 tmp_path):
    base_dir, base = base_run
    run = train(finetune_config(text_file, base_dir, **{"train.steps": 5}), tmp_path,
                progress=False)
    assert run.config.model.num_layers == 2 and run.config.model.position == "rotary"
    assert run.config.data.tokenizer == "char"
    # Its first evaluation-free loss is the base model's, not a fresh model's (~log vocab).
    fresh = train(tiny_lm_config(**{"data.path": str(text_file), "train.steps": 5, **ROTARY}),
                  tmp_path / "fresh", progress=False)
    assert losses(tmp_path)[0] < losses(fresh.workdir)[0] - 0.2


def test_init_from_refuses_a_contradicting_key(base_run, text_file, tmp_path):
    base_dir, _ = base_run
    with pytest.raises(ConfigError, match="model.num_layers=3"):
        train(finetune_config(text_file, base_dir, **{"model.num_layers": 3}), tmp_path,
              progress=False)
    assert not (tmp_path / "config.json").exists()


def test_lora_trains_the_adapters_only(base_run, text_file, tmp_path):
    base_dir, base = base_run
    config = finetune_config(text_file, base_dir, **{"model.lora.rank": 4,
                                                     "model.lora.targets": "all"})
    run = train(config, tmp_path, progress=False)
    state = run.state
    adapters = jax.tree.leaves(state.params)
    assert len(adapters) == 2 * 7 * 2  # A and B of q, k, v, out, gate, up, down; 2 layers
    # The optimizer holds Adam's two moments of the adapters and nothing of the base.
    n_adapter = sum(x.size for x in adapters)
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert n_opt == 2 * n_adapter
    # The frozen base is exactly the base run's weights.
    for ours, theirs in zip(jax.tree.leaves(state.frozen),
                            jax.tree.leaves(base.family.export_params(base.state)), strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    # The adapters moved (B starts at zero), and exporting folds them into the kernels: the
    # model without adapters computes the same logits with the merged weights.
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(state.params)) > 0
    merged = run.family.export_params(state)
    cfg_plain = TransformerConfig(vocab_size=_vocab(run), block_size=16, num_layers=2,
                                  num_heads=2, embed_dim=32, position="rotary", norm="rmsnorm",
                                  mlp="swiglu", use_bias=False)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, _vocab(run), (2, 16)))
    plain = _logits(cfg_plain, merged, tokens)
    with_adapters = _lora_logits(run, tokens)
    np.testing.assert_allclose(plain, with_adapters, atol=1e-4, rtol=1e-4)
    assert np.abs(plain - _logits(cfg_plain, base.family.export_params(base.state),
                                  tokens)).max() > 1e-3


def _vocab(run) -> int:
    return run.pipeline.info["tokenizer"].vocab_size


def _logits(cfg, params, tokens):
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    return np.asarray(nnx.merge(graphdef, params)(tokens)[0])


def _lora_logits(run, tokens):
    from genai_jax.models.lm import model_config

    cfg = model_config(run.config, _vocab(run))
    return _logits(cfg, run.state.eval_params, tokens)


def test_lora_targets_that_name_no_module_are_refused(base_run, text_file, tmp_path):
    base_dir, _ = base_run
    with pytest.raises(ConfigError, match="names no projection"):
        train(finetune_config(text_file, base_dir, **{"model.lora.rank": 4,
                                                      "model.lora.targets": "q,wq"}),
              tmp_path, progress=False)
    with pytest.raises(ConfigError, match="'gate'"):
        train(tiny_lm_config(**{"data.path": str(text_file), "model.lora.rank": 4,
                                "model.lora.targets": "gate"}), tmp_path, progress=False)
    # Whole modules trained beside the adapters: known ones, with adapters, and not the head
    # of a model whose head is its embedding.
    for overrides, message in [({"model.lora.rank": 4, "model.lora.modules_to_save": "embed,mlp"},
                                "'mlp' names no module"),
                               ({"model.lora.modules_to_save": "embed"}, "needs model.lora.rank"),
                               ({"model.lora.rank": 4, "model.lora.modules_to_save": "lm_head"},
                                "tie_embeddings")]:
        with pytest.raises(ConfigError, match=message):
            train(finetune_config(text_file, base_dir, **overrides), tmp_path, progress=False)


# ---- instruction data ------------------------------------------------------------------------


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_completion_only_loss_mask_and_packing(tmp_path):
    tok = Tokenizer("byte")
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "Q: 2+2? ", "completion": "A: 4"},
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
        {"prompt": "x", "completion": "yz"}])
    examples = read_jsonl(path, tok)
    windows = pack(examples, 64)
    # Everything fits one window: three segments, positions restarting at 0.
    assert windows["segment_ids"].shape == (1, 64)
    seg = windows["segment_ids"][0]
    assert sorted(set(seg.tolist())) == [0, 1, 2, 3]
    for s in (1, 2, 3):
        np.testing.assert_array_equal(windows["positions"][0][seg == s],
                                      np.arange((seg == s).sum()))
    # The loss counts the completion tokens (and the assistant's message) only.
    mask = windows["loss_mask"][0].astype(bool)
    targets = windows["targets"][0]
    assert tok.decode(targets[mask & (seg == 1)]) == "A: 4"
    assert tok.decode(targets[mask & (seg == 2)]) == "hello\n"
    assert tok.decode(targets[mask & (seg == 3)]) == "yz"


def test_a_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a"}\n')
    with pytest.raises(DataError, match="line 3"):
        read_jsonl(path, Tokenizer("byte"))
    path.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    with pytest.raises(DataError, match="line 2 is not JSON"):
        read_jsonl(path, Tokenizer("byte"))


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_attention_never_crosses_packed_examples(implementation):
    """The logits of a packed window equal those of each example run alone."""
    cfg = TransformerConfig(vocab_size=50, block_size=32, num_layers=2, num_heads=2,
                            num_kv_heads=1, embed_dim=32, position="rotary", norm="rmsnorm",
                            mlp="swiglu", attention=implementation)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 50, 11), rng.integers(0, 50, 14)
    tokens = np.zeros((1, 32), np.int32)
    tokens[0, :11], tokens[0, 11:25] = a, b
    seg = np.zeros((1, 32), np.int32)
    seg[0, :11], seg[0, 11:25] = 1, 2
    pos = np.zeros((1, 32), np.int32)
    pos[0, :11], pos[0, 11:25] = np.arange(11), np.arange(14)
    packed = np.asarray(model(jnp.asarray(tokens), positions=jnp.asarray(pos),
                              segment_ids=jnp.asarray(seg))[0])
    alone_a = np.asarray(model(jnp.asarray(a[None]))[0])
    alone_b = np.asarray(model(jnp.asarray(b[None]))[0])
    np.testing.assert_allclose(packed[0, :11], alone_a[0], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(packed[0, 11:25], alone_b[0], atol=2e-5, rtol=1e-5)


def test_instruction_split_and_bits_per_byte_normaliser(tmp_path):
    records = [{"prompt": f"say {i}: ", "completion": f"number {i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", records)

    class Cfg:
        pass

    cfg = Cfg()
    cfg.path, cfg.validation_fraction = str(path), 0.1
    data = load_instructions(cfg, Tokenizer("byte"), 64, seed=0)
    # Held out: the last 2 examples; bytes per trained token: completion bytes / (tokens).
    trained = lambda windows: sum(windows[i]["loss_mask"].sum() for i in range(len(windows)))
    assert trained(data.validation) == len("number 18") + len("number 19")
    assert data.bytes_per_token == pytest.approx(1.0)
    assert trained(data.train) == sum(len(f"number {i}") for i in range(18))
    # prepared once into the cache: read from there again, windows in the same order; packed
    # as `pack` packs the examples in memory
    again = load_instructions(cfg, Tokenizer("byte"), 64, seed=0)
    assert again.train.directory == data.train.directory
    examples = read_jsonl(path, Tokenizer("byte"))
    order = np.random.default_rng(0).permutation(18)
    packed = pack([examples[i] for i in order], 64)
    assert len(data.train) == len(packed["inputs"])
    for i in range(len(data.train)):
        for key, value in data.train[i].items():
            np.testing.assert_array_equal(value, packed[key][i])
    other_seed = load_instructions(cfg, Tokenizer("byte"), 64, seed=1)
    assert other_seed.train.directory != data.train.directory


def test_instruction_tokenizer_is_built_line_by_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "héllo ", "completion": "wörld"}] * 3)
    assert set(new_tokenizer("char", path).chars) == set(path.read_text())
    path.write_bytes(path.read_bytes() + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match="d.jsonl line 4 is not UTF-8"):
        new_tokenizer("char", path)


def test_instruction_data_trains_and_evaluates(tmp_path, env):
    """`data.name=instructions` through the trainer, then `experiments.evaluate` on every
    held-out window."""
    from tests.test_cli import cli

    records = [{"prompt": f"Q{i}: what is {i} + {i}? ", "completion": f"{2 * i}."}
               for i in range(60)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    config = tiny_lm_config(**{"data.name": "instructions", "data.path": str(path),
                               "data.tokenizer": "byte", "model.block_size": 64,
                               "train.steps": 10})
    run = train(config, tmp_path / "w", progress=False)
    assert set(run.pipeline.eval[0]) == {"inputs", "targets", "loss_mask", "segment_ids",
                                         "positions"}
    first, last = losses(tmp_path / "w")[0], losses(tmp_path / "w")[-1]
    assert last < first
    proc = cli("evaluate", f"--workdir={tmp_path / 'w'}", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["validation_windows"] >= 1 and np.isfinite(result["bits_per_byte"])


def test_lora_on_a_bfloat16_base(base_run, text_file, tmp_path):
    """The frozen base may be stored in bfloat16; the adapters stay float32 and train."""
    base_dir, _ = base_run
    config = finetune_config(text_file, base_dir, **{"model.lora.rank": 4,
                                                     "model.param_dtype": "bfloat16"})
    run = train(config, tmp_path, progress=False)
    assert {x.dtype for x in jax.tree.leaves(run.state.frozen)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(run.state.params)} == {jnp.dtype(jnp.float32)}
    assert all(np.isfinite(loss) for loss in losses(tmp_path))
