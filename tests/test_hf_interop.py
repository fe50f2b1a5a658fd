"""Hugging Face checkpoints in and out (`genai_jax.interop.huggingface`,
`experiments.import_checkpoint`, `experiments.export_checkpoint`), checked against
`transformers` itself on small random models of each supported architecture."""

from __future__ import annotations

import functools
import json
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
from tests.test_cli import cli, error_line  # noqa: E402

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


# ---- the command-line tools ------------------------------------------------------------------


def safetensors_dict(directory: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def hf_logits(directory, x) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return torch_logits(model.eval(), x)


@pytest.fixture(scope="module")
def imported_llama(hf_models, tmp_path_factory, env):
    directory, _ = hf_models["llama"]
    workdir = tmp_path_factory.mktemp("imported") / "llama"
    proc = cli("import_checkpoint", f"--hf_dir={directory}", f"--workdir={workdir}", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return workdir


def test_a_tensor_is_read_in_blocks_into_a_view_of_the_parameter(hf_models):
    """What the import does with a Linear weight: block by block (here of 3 rows) through the
    transposed view of our kernel's buffer, cast to its dtype on the way."""
    import ml_dtypes

    directory, _ = hf_models["llama"]
    files = hf.TensorFiles(directory)
    name = "model.layers.0.mlp.up_proj.weight"
    whole = files.get(name)
    for dtype in (np.float32, ml_dtypes.bfloat16):
        kernel = hf._mapped_empty(whole.shape[::-1], np.dtype(dtype))
        files.read_into(name, kernel.T, block_bytes=3 * whole.shape[1] * kernel.itemsize)
        np.testing.assert_array_equal(kernel, whole.T.astype(dtype))


def test_import_sample_export_round_trip(hf_models, imported_llama, tmp_path, env):
    """Import, sample, then export (sharded): the weights come back bit for bit, with the
    tokenizer, and `transformers` loads the export with the same logits."""
    directory, model = hf_models["llama"]
    workdir = imported_llama
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "hf_import.json",
            "checkpoints"} <= {p.name for p in workdir.iterdir()}
    proc = cli("sample", f"--workdir={workdir}", "--prompt=The quick", "--max_new_tokens=6",
               "--temperature=0", env=env)
    assert proc.returncode == 0 and "The quick" in proc.stdout, proc.stderr[-2000:]
    out = tmp_path / "export"
    proc = cli("export_checkpoint", f"--workdir={workdir}", f"--hf_dir={out}",
               "--max_shard_mb=0.1", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "model.safetensors.index.json").exists()
    original, exported = safetensors_dict(directory), safetensors_dict(out)
    assert set(exported) == set(original)
    for name, value in original.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    x = tokens(seed=3)
    np.testing.assert_allclose(hf_logits(out, x), torch_logits(model, x), atol=1e-5, rtol=0)
    from transformers import AutoTokenizer

    text = "The quick brown fox, def main():"
    assert (AutoTokenizer.from_pretrained(out).encode(text, add_special_tokens=False)
            == AutoTokenizer.from_pretrained(directory).encode(text, add_special_tokens=False))


def test_a_from_scratch_model_with_learned_positions_exports_as_gpt2(text_file, tmp_path, env):
    from genai_jax.tokenization.tokenizers import load_tokenizer
    from genai_jax.train import train
    from tests.conftest import tiny_lm_config

    run = train(tiny_lm_config(**{"data.path": str(text_file), "train.steps": 10,
                                  "model.position": "learned"}), tmp_path / "run",
                progress=False)
    out = tmp_path / "gpt2"
    proc = cli("export_checkpoint", f"--workdir={tmp_path / 'run'}", f"--hf_dir={out}", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    tokenizer = load_tokenizer(tmp_path / "run")
    text = text_file.read_text()[:200]
    ids = tokenizer.encode(text)
    import tokenizers

    assert tokenizers.Tokenizer.from_file(str(out / "tokenizer.json")).encode(text).ids == list(ids)
    x = ids[None, :16].astype(np.int32)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(hf.transformer_config(out),
                                                               rngs=nnx.Rngs(0))))
    ours = np.asarray(nnx.merge(graphdef, run.state.eval_params)(x)[0])
    np.testing.assert_allclose(hf_logits(out, x), ours, atol=tolerance(ours), rtol=0)


def test_lora_adapter_exports_for_peft(hf_models, imported_llama, text_file, tmp_path, env):
    """A LoRA run on the imported Llama that also trains the embedding and the head whole
    (PEFT's `modules_to_save`): its PEFT adapter, loaded by `peft` onto the Hugging Face base
    model, gives genai_jax's logits."""
    import peft
    import torch
    import transformers

    from genai_jax.models.lm import model_config
    from genai_jax.train import train
    from tests.test_finetune import finetune_config

    config = finetune_config(text_file, imported_llama, **{
        "model.lora.rank": 4, "model.lora.targets": "q,v,o_proj,down", "train.steps": 10,
        "model.lora.modules_to_save": "embed_tokens,head", "train.learning_rate": 0.05,
        "model.block_size": 32})
    run = train(config, tmp_path / "lora", progress=False)
    # Trained: the adapters, the embedding and the head (float32); the rest is frozen.
    trained = {path[0] for path in hf._flat_paths(run.state.params)}
    assert trained == {"blocks", "embed", "head"}
    assert not {"embed", "head"} & {path[0] for path in hf._flat_paths(run.state.frozen)}
    out = tmp_path / "adapter"
    proc = cli("export_checkpoint", f"--workdir={tmp_path / 'lora'}", f"--hf_dir={out}",
               "--adapter_only", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    saved = json.loads((out / "adapter_config.json").read_text())["modules_to_save"]
    assert saved == ["embed_tokens", "lm_head"]
    directory, _ = hf_models["llama"]
    base = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, out).eval()
    x = tokens(length=32, seed=4)
    cfg = model_config(run.config, run.pipeline.info["tokenizer"].vocab_size)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    ours = np.asarray(nnx.merge(graphdef, run.state.eval_params)(x)[0])
    theirs = torch_logits(peft_model, x)
    np.testing.assert_allclose(theirs, ours, atol=tolerance(ours), rtol=0)
    # ... and the adapters matter: the base alone (a fresh copy: peft adapted `base` in place)
    # is far from them.
    alone = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert np.abs(torch_logits(alone.eval(), x) - ours).max() > 100 * tolerance(ours)


def test_a_trained_tied_embedding_exports_for_peft(hf_models, tmp_path):
    """A LoRA state of tied Qwen2 whose embedding (also its head) was trained whole: PEFT ties
    the two again, so its logits are genai_jax's (adapters and embedding moved at random)."""
    import dataclasses

    import peft
    import torch
    import transformers

    from genai_jax.nn import LoRA, LoRAParam

    directory, _ = hf_models["qwen2"]
    plain = hf.transformer_config(directory)
    assert plain.tie_embeddings
    cfg = dataclasses.replace(plain, lora=LoRA(4, 8.0), lora_targets=("q", "v"))
    params = nnx.merge_state(nnx.state(Transformer(cfg, rngs=nnx.Rngs(1)), nnx.Param),
                             hf.load_params(directory, plain))
    key = iter(jax.random.split(jax.random.PRNGKey(2), 64))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.3 * jax.random.normal(next(key), x.shape) if {"lora_b", "embed"}
        & {getattr(k, "key", None) for k in path} else x, params)
    trained, _ = nnx.split_state(params, nnx.Any(LoRAParam, nnx.PathContains("embed")), ...)
    adapter_config, tensors = hf.export_adapter(trained, cfg, "qwen2")
    out = tmp_path / "adapter"
    hf.write_safetensors(tensors, out, name="adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(
        {**adapter_config, "base_model_name_or_path": str(directory)}))
    base = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, out).eval()
    x = tokens(seed=5)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    ours = np.asarray(nnx.merge(graphdef, params)(x)[0])
    np.testing.assert_allclose(torch_logits(peft_model, x), ours, atol=tolerance(ours), rtol=0)


def test_import_onto_fsdp8_in_bfloat16(hf_models, tmp_path, env):
    directory, _ = hf_models["qwen2"]
    run_env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = cli("import_checkpoint", f"--hf_dir={directory}", f"--workdir={tmp_path / 'w'}",
               "--mesh=1,8,1", "--param_dtype=bfloat16", env=run_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    check = (
        "import jax, sys; from experiments.common import load_workdir_config as load\n"
        "from genai_jax.train import prepare\n"
        f"run = prepare(load('{tmp_path / 'w'}'), '{tmp_path / 'w'}', read_only=True)\n"
        "leaves = jax.tree.leaves(run.state.params)\n"
        "assert all(x.dtype == jax.numpy.bfloat16 for x in leaves)\n"
        "assert max(len(x.sharding.device_set) for x in leaves) == 8\n"
        "print('ok', run.mesh.shape)\n")
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", check], env=run_env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
    assert "('fsdp', 8)" in proc.stdout


def broken_copy(source: pathlib.Path, target: pathlib.Path, **config_changes) -> pathlib.Path:
    import shutil

    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(config_changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_bad_checkpoints_are_refused_with_one_line(hf_models, tmp_path, env):
    directory, _ = hf_models["llama"]
    cases = {
        "model_type 'bert' is not supported": broken_copy(directory, tmp_path / "bert",
                                                          model_type="bert"),
        "mlp.gate_proj.weight' in": broken_copy(directory, tmp_path / "shape",
                                                intermediate_size=128),
        "the tokenizer has": broken_copy(directory, tmp_path / "vocab", vocab_size=200),
        "sliding window of 16": broken_copy(directory, tmp_path / "window", model_type="mistral",
                                            sliding_window=16),
    }
    missing = broken_copy(directory, tmp_path / "missing")
    (missing / "model.safetensors").unlink()
    cases["has neither model.safetensors"] = missing
    for expected, source in cases.items():
        workdir = tmp_path / f"out_{source.name}"
        proc = cli("import_checkpoint", f"--hf_dir={source}", f"--workdir={workdir}", env=env)
        assert expected in error_line(proc), (expected, proc.stderr[-1000:])
        assert not workdir.exists(), expected


def test_benchmark_alternates_with_the_transformers_peer(text_file, tmp_path, env):
    """`experiments.random_hf_model` writes a Llama with a trained BPE tokenizer; imported, a
    LoRA fine-tuning config benchmarks against `hf_train_ref.py` training that same checkpoint
    with peft: the same adapters (q, k, v, o at rank 8: equal trainable counts). A peer that
    cannot train the run's model is refused before anything compiles."""
    from tests.conftest import ROOT

    peer = ROOT.parent / "shared" / "bench" / "hf_train_ref.py"
    if not peer.is_file():
        pytest.skip(f"{peer} is not there")
    hf_dir, workdir = tmp_path / "hf", tmp_path / "imported"
    proc = cli("random_hf_model", f"--text={text_file}", f"--hf_dir={hf_dir}", "--layers=2",
               "--dim=32", "--heads=4", "--kv_heads=2", "--mlp=64", "--vocab=300", "--ctx=32",
               env=env)
    assert proc.returncode == 0 and "random Llama" in proc.stdout, proc.stderr[-3000:]
    assert hf.read_config(hf_dir)["model_type"] == "llama"
    proc = cli("import_checkpoint", f"--hf_dir={hf_dir}", f"--workdir={workdir}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    common = ["--config=experiments/configs/finetune_lora.py", f"--config.init_from={workdir}",
              f"--config.data.path={text_file}", "--config.train.batch_size=4",
              f"--peer={peer}", "--steps=2", "--rounds=1", "--decode_tokens=4"]
    proc = cli("benchmark", *common, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["peer_tokens_per_s"] > 0 and "--mode lora" in result["peer_command"]
    assert result["trainable_params"] == result["peer_trainable_params"] == 2 * 8 * (
        (32 + 32) + (32 + 16) + (32 + 16) + (32 + 32))  # 2 layers x rank 8 x (q, k, v, o)
    assert result["frozen_params"] > 0 and result["opt_state_bytes_per_device"] > 0
    assert error_line(cli("benchmark", *common, "--config.model.lora.targets=all", env=env)) \
        .endswith("run with model.lora.targets='attention' (not 'all')")
