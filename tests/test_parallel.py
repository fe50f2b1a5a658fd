"""Sharded training on a named mesh: the same training on every layout, FSDP's memory split, a
checkpoint restored onto another mesh, several processes, and bad meshes refused up front.

Simulated devices need their own process (the device count is fixed when JAX starts), so the
sharded runs happen in subprocesses (`tests/sharded_runs.py`), one per device count, shared by
the tests below.

Tolerance of "the same losses": a sharded step computes the same math with its reductions
(gradient all-reduces, sums over split dimensions) added in another order. Each reassociated
float32 sum moves by a few ulp (~1e-7 relative), and over 20 Adam steps these stay at ~1e-6
(measured here: at most 3e-7). `RTOL = 2e-5` is well above that, while every sharding bug we
guard against (a missing gradient all-reduce, a gradient summed twice, rows of the batch
dropped or duplicated, a wrong restore) changes the loss by more than 1e-3 within a few steps.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT, tiny_lm_config
from tests.test_cli import CHAR, TINY, cli, error_line

RTOL = 2e-5
LAYOUTS = ["8,1,1", "1,8,1", "2,2,2"]  # data, fsdp, tensor


def with_devices(env: dict, n: int) -> dict:
    return {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}


# --- the mesh, the rules, remat: in this process --------------------------------------------


@pytest.mark.parametrize("mesh,devices,expected", [
    (dict(data=-1, fsdp=1, tensor=1), 8, (8, 1, 1)),
    (dict(data=2, fsdp=-1, tensor=2), 8, (2, 2, 2)),
    (dict(data=1, fsdp=8, tensor=1), 8, (1, 8, 1)),
])
def test_mesh_shape_fills_minus_one(mesh, devices, expected):
    from genai_jax.parallel import mesh_shape

    assert mesh_shape(mesh, devices) == expected


@pytest.mark.parametrize("mesh,message", [
    (dict(data=3, fsdp=1, tensor=1), "mesh data=3 x fsdp=1 x tensor=1 has 3 devices but there "
                                     "are 8"),
    (dict(data=-1, fsdp=-1, tensor=1), "at most one is -1"),
    (dict(data=-1, fsdp=3, tensor=1), "does not divide the 8 devices"),
    (dict(data=0, fsdp=8, tensor=1), "each axis is a positive size"),
])
def test_bad_mesh_names_both_counts(mesh, message):
    from genai_jax.parallel import MeshError, mesh_shape

    with pytest.raises(MeshError, match=message):
        mesh_shape(mesh, 8)


def test_rules_from_the_config():
    import ml_collections

    from genai_jax.parallel import MeshError, rules_from_config

    mesh = ml_collections.ConfigDict({"rules": {"embed": "tensor", "batch": "data,fsdp",
                                                "vocab": ""}})
    rules = rules_from_config(mesh)
    assert rules["embed"] == "tensor" and rules["batch"] == ("data", "fsdp")
    assert rules["vocab"] is None and rules["mlp"] == ("tensor", "fsdp")  # untouched default
    with pytest.raises(MeshError, match="mesh.rules.embed='model'"):
        rules_from_config(ml_collections.ConfigDict({"rules": {"embed": "model"}}))


def test_spec_takes_the_longest_dividing_prefix_and_each_axis_once():
    import jax
    from jax.sharding import PartitionSpec as P

    from genai_jax.parallel import DEFAULT_RULES, spec_for

    mesh = jax.sharding.AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    assert spec_for(("embed", "mlp"), (32, 128), mesh, DEFAULT_RULES) == P("fsdp", "tensor")
    assert spec_for(("mlp", "embed"), (128, 32), mesh, DEFAULT_RULES) == P(("tensor", "fsdp"),
                                                                           None)
    assert spec_for(("mlp",), (6,), mesh, DEFAULT_RULES) == P("tensor")  # 6 % 4: tensor only
    assert spec_for(("vocab", "embed"), (65, 32), mesh, DEFAULT_RULES) == P(None, "fsdp")
    assert spec_for(("batch", None), (8, 3), mesh, DEFAULT_RULES) == P(("data", "fsdp"), None)


def test_bad_rule_is_one_line(text_file, env, tmp_path):
    proc = cli("train", f"--config={CHAR}", f"--workdir={tmp_path}", *TINY,
               f"--config.data.path={text_file}", "--config.mesh.rules.mlp=tensor,model", env=env)
    assert "mesh.rules.mlp='tensor,model': give distinct mesh axes" in error_line(proc)
    assert not list(tmp_path.iterdir())


def _transformer(policy: str):
    from flax import nnx

    from genai_jax.models.lm import model_config
    from genai_jax.models.transformer import Transformer

    cfg = model_config(tiny_lm_config(**{"data.path": "unused", "model.remat": policy}), 30)
    tokens = np.arange(64).reshape(4, 16) % 20
    return Transformer(cfg, rngs=nnx.Rngs(0)), lambda model: model(tokens)[0]


def _unet(policy: str):
    import jax
    from flax import nnx

    from genai_jax.nn.unet import UNet, UNetConfig

    cfg = UNetConfig(shape=(8, 8, 1), num_classes=10, channels=8, channel_mult=(1, 2),
                     num_res_blocks=1, groups=4, num_heads=2, remat=policy)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 1))
    model = UNet(cfg, rngs=nnx.Rngs(0))
    model.conv_out.kernel[...] = 0.1 * jax.random.normal(jax.random.PRNGKey(2),
                                                         model.conv_out.kernel.shape)
    return model, lambda model: model(x, np.arange(4), np.arange(4))


@pytest.mark.parametrize("build", [_transformer, pytest.param(_unet, marks=pytest.mark.slow)],
                         ids=["transformer", "unet"])
def test_remat_keeps_less_for_the_backward_pass_and_gives_the_same_gradients(build):
    """What the forward pass keeps for the backward pass (the residuals inside `jax.vjp`'s
    closure): every activation without remat, each block's inputs with `full`, and also the
    matmul outputs with `dots`. The gradients stay those of the model without remat."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def loss_and_params(policy: str):
        model, apply = build(policy)
        graphdef, params = nnx.split(model)
        return (lambda p: jnp.mean(apply(nnx.merge(graphdef, p)) ** 2)), params

    def residual_bytes(policy: str) -> int:
        loss, params = loss_and_params(policy)
        residuals = jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params)  # shapes only
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(residuals))

    none, full, dots = map(residual_bytes, ("none", "full", "dots"))
    # measured (none / dots / full): transformer 686k / 287k / 156k bytes, UNet 2.2M / 540k / 385k
    assert full < dots < none and full < none / 3, (none, dots, full)
    (loss, params), (full_loss, _) = loss_and_params("none"), loss_and_params("full")
    for a, b in zip(jax.tree.leaves(jax.jit(jax.grad(full_loss))(params)),
                    jax.tree.leaves(jax.jit(jax.grad(loss))(params)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_remat_is_the_same_training_step_with_dropout(text_file):
    """The family's whole step, dropout included: the recomputed forward pass draws the same
    dropout masks (the key is an argument of the block), so the update is the same."""
    import jax

    from genai_jax import data, models

    def loss_and_grads(policy):
        config = tiny_lm_config(**{"data.path": str(text_file), "model.remat": policy,
                                   "model.dropout": 0.1})
        family = models.build(config, data.build(config, "text", None).info)
        state = jax.jit(family.init)(jax.random.PRNGKey(0))
        batch = {"inputs": np.arange(64).reshape(4, 16) % 20,
                 "targets": np.arange(1, 65).reshape(4, 16) % 20}
        new_state, metrics = jax.jit(family.train_step)(state, batch)
        return metrics["loss"], new_state.params

    (loss, params), (loss_remat, params_remat) = loss_and_grads("none"), loss_and_grads("full")
    np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(params_remat), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_distributed_start_needs_all_three_values():
    from genai_jax.errors import UserError
    from genai_jax.parallel import initialize

    assert initialize() is False  # one process: no distributed runtime
    assert initialize("127.0.0.1:1234", 1, 0) is False
    with pytest.raises(UserError, match="missing: process_id"):
        initialize("127.0.0.1:1234", 2, None)
    with pytest.raises(UserError, match="--process_id=2 must be in"):
        initialize("127.0.0.1:1234", 2, 2)


# --- sharded training on 8 simulated devices ------------------------------------------------


@pytest.fixture(scope="module")
def sharded(text_file, env, tmp_path_factory):
    """`{layout: {family: {"losses", "bytes"}}, "resharded_lm_losses": [...]}` of the runs of
    `sharded_runs.py` on 1 and on 8 simulated devices, and the root of their workdirs."""
    root = tmp_path_factory.mktemp("sharded")
    results = {}
    for devices, layouts in ((1, ["1,1,1"]), (8, ["2,2,2", *LAYOUTS[:2]])):
        out = root / f"{devices}.json"
        proc = subprocess.run([sys.executable, "tests/sharded_runs.py", str(out), str(text_file),
                               str(root), *layouts], cwd=ROOT, env=with_devices(env, devices),
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        # (DP-SGD's per-example gradients, traced inside a vmap without the activation
        # constraints, still get a few at these tiny shapes: known, see the README's Privacy.)
        remats = [line for line in proc.stderr.splitlines()
                  if "Involuntary full rematerialization" in line and "/vmap(" not in line]
        assert not remats, remats[:3]
        results.update(json.loads(out.read_text()))
    return results, root


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_same_losses_on_every_layout(sharded, layout):
    results, _ = sharded
    for family, run in results[layout].items():
        for key, reference in results["1,1,1"][family]["losses"].items():
            assert len(run["losses"][key]) == len(reference) >= 1, (family, key)
            np.testing.assert_allclose(run["losses"][key], reference, rtol=RTOL,
                                       err_msg=f"{family} {key}")
    assert len(results[layout]["lm"]["losses"]["train"]) == 20  # every step


@pytest.mark.slow
@pytest.mark.parametrize("family", ["lm", "gan"])
def test_fsdp_holds_an_eighth_of_the_state_per_device(sharded, family):
    """Parameters, optimizer moments (and the GAN's two of each, and its EMA generator), measured
    from the arrays' shards: each device holds 1/8, up to the few replicated scalars (step
    counters, RNG keys), and the biggest array is split in 8 equal shards."""
    results, _ = sharded
    whole = results["1,1,1"][family]["bytes"]["total"]
    held = results["1,8,1"][family]["bytes"]
    assert len(held["per_device"]) == 8
    assert max(held["per_device"]) <= whole / 8 + 256, (held["per_device"], whole)
    shards = held["largest_array_shards"]
    assert len(set(shards)) == 1 and shards[0] * 8 == max(
        results["1,1,1"][family]["bytes"]["largest_array_shards"])
    # data parallelism replicates everything, as it should
    assert min(results["8,1,1"][family]["bytes"]["per_device"]) == whole


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh(sharded):
    """Trained to step 10 on fsdp=8, resumed on data=2 x fsdp=2 x tensor=2 to step 20: the
    losses are those of the run that was never interrupted."""
    results, _ = sharded
    for key, losses in results["resharded_lm_losses"].items():
        np.testing.assert_allclose(losses, results["1,8,1"]["lm"]["losses"][key], rtol=RTOL)


@pytest.mark.slow
def test_an_8_device_checkpoint_samples_and_evaluates_on_one_device(sharded, env):
    _, root = sharded
    workdir = root / "lm_1x8x1"
    config_before = (workdir / "config.json").read_text()
    proc = cli("sample", f"--workdir={workdir}", "--prompt=The", "--max_new_tokens=8", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loading the run with every device on the fsdp axis" in proc.stderr
    assert list((workdir / "samples").glob("step_00000020.txt"))
    proc = cli("evaluate", f"--workdir={workdir}", "--mesh=1,1,1", "--max_batches=2", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1])["step"] == 20
    assert (workdir / "config.json").read_text() == config_before  # read-only


@pytest.mark.parametrize("args,message", [
    (["--config.mesh.data=3"], "mesh data=3 x fsdp=1 x tensor=1 has 3 devices but there are 8"),
    (["--config.mesh.fsdp=8", "--config.train.batch_size=12"],
     "train.batch_size=12 (micro-batches of 12) does not divide over the 8 data-parallel"),
    (["--config.mesh.data=2", "--config.mesh.tensor=4", "--config.train.batch_size=6",
      "--config.train.grad_accum_steps=2"], "(micro-batches of 3) does not divide over the 2"),
])
def test_bad_mesh_or_batch_is_one_line_before_compiling(args, message, text_file, env,
                                                          tmp_path):
    proc = cli("train", f"--config={CHAR}", f"--workdir={tmp_path}", *TINY,
               f"--config.data.path={text_file}", "--config.mesh.data=-1", *args,
               env=with_devices(env, 8))
    assert message in error_line(proc)
    assert not list(tmp_path.iterdir())


# --- several processes ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_module(module: str, env, processes: int, devices_each: int, *args: str):
    """`processes` processes of `experiments.<module>` with `devices_each` CPU devices each,
    connected on loopback."""
    command = [sys.executable, "-m", f"experiments.{module}", *args]
    env = {**env, "JAX_NUM_CPU_DEVICES": str(devices_each)}
    port = free_port()
    connect = (lambda i: [f"--coordinator_address=127.0.0.1:{port}",
                          f"--num_processes={processes}", f"--process_id={i}"]
               ) if processes > 1 else (lambda i: [])
    return [subprocess.Popen(command + connect(i), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(processes)]


def launch(workdir, text_file, env, processes: int, devices_each: int, *extra: str):
    """The tiny LM trained by `processes` processes of `devices_each` CPU devices."""
    return launch_module("train", env, processes, devices_each, f"--config={CHAR}",
                         f"--workdir={workdir}", *TINY, f"--config.data.path={text_file}",
                         "--config.train.batch_size=8", "--config.train.steps=20",
                         "--config.sample.max_new_tokens=8", *extra)


def finish(procs, timeout: int = 300) -> list[tuple[str, str]]:
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return outs


@pytest.mark.slow
def test_two_processes_train_like_one_process_of_four_devices(text_file, env, tmp_path):
    """...each reading only its rows of each global batch (through a data worker), and write
    one metrics file, one sharded checkpoint that they restore together (the second launch
    resumes from step 20 to 30), and one sample; the run of one process resumes on two
    processes with the same batches."""
    from genai_jax.train.metrics import read_metrics

    one, two = tmp_path / "one", tmp_path / "two"
    finish(launch(one, text_file, env, 1, 4))
    outs = finish(launch(two, text_file, env, 2, 2, "--config.data.workers=1"))
    assert (two / "checkpoints" / "20").is_dir()
    assert "sample at step 20" in outs[0][0] and "sample at step" not in outs[1][0]
    for workdir in (one, two):
        finish(launch(workdir, text_file, env, 2, 2, "--config.train.steps=30", "--nosample"))
    reference, metrics = read_metrics(one), read_metrics(two)
    # each logged step once: process 0 alone writes
    assert [r["step"] for r in metrics] == [r["step"] for r in reference] == [5, 10, 15, 20,
                                                                             25, 30]
    for key in ("train/loss", "eval/loss"):
        np.testing.assert_allclose([r[key] for r in metrics if key in r],
                                   [r[key] for r in reference if key in r], rtol=RTOL)


@pytest.mark.slow
def test_two_processes_sample_a_gan_sharded_over_both(env, tmp_path):
    """FSDP over the devices of 2 processes: every process must join the computations that
    draw the samples and the extra pictures (they all-gather the weights), while only process 0
    writes them; then `experiments.sample` does the same from the checkpoint."""
    overrides = ["--config=experiments/configs/gan_digits.py", f"--workdir={tmp_path}",
                 "--config.model.z_dim=8", "--config.model.g_channels=8",
                 "--config.model.d_channels=8", "--config.train.steps=4",
                 "--config.train.batch_size=16", "--config.train.steps_per_call=1",
                 "--config.train.log_every=2", "--config.eval.every=4", "--config.eval.steps=1",
                 "--config.eval.num_samples=0", "--config.checkpoint.every=4",
                 "--config.sample.num_samples=20", "--config.mesh.data=1",
                 "--config.mesh.fsdp=4"]
    procs = launch_module("train", env, 2, 2, *overrides)
    outs = finish(procs, timeout=600)
    assert "interpolation:" in outs[0][0] and "sample at step" not in outs[1][0]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "interpolation_00000004.png", "step_00000004.png"]
    outs = finish(launch_module("sample", env, 2, 2, f"--workdir={tmp_path}", "--seed=3"))
    assert "samples:" in outs[0][0]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_to_one_process_stops_every_process_at_one_step(stop, text_file, env,
                                                                           tmp_path):
    procs = launch(tmp_path, text_file, env, 2, 1, "--config.train.steps=100000",
                   "--config.checkpoint.every=100000", "--nosample")
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.5)
    procs[1].send_signal(stop)
    outs = finish(procs, timeout=120)
    steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir()]
    assert len(steps) == 1 and steps[0] >= 5
    for _, err in outs:
        assert f"agreed by all processes): saved a checkpoint at step {steps[0]}" in err


@pytest.mark.parametrize("failing", [0, 1])
def test_an_error_on_one_process_stops_every_process_with_its_line(failing, text_file, env,
                                                                   tmp_path):
    """The failing process's data path does not exist; the other one is already waiting for
    it in a collective and would wait for the coordination service's timeout (minutes)."""
    port = free_port()
    procs = []
    for i in range(2):
        path = tmp_path / "missing.txt" if i == failing else text_file
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "experiments.train", f"--config={CHAR}",
             f"--workdir={tmp_path / 'run'}", *TINY, f"--config.data.path={path}",
             "--config.train.batch_size=8", f"--coordinator_address=127.0.0.1:{port}",
             "--num_processes=2", f"--process_id={i}"],
            cwd=ROOT, env={**env, "JAX_NUM_CPU_DEVICES": "1"}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    t0 = time.time()
    errs = [p.communicate(timeout=240)[1] for p in procs]
    assert time.time() - t0 < 120  # the coordination service's own timeouts are minutes
    for i, (p, err) in enumerate(zip(procs, errs, strict=True)):
        # the head too: an abort's report ends in a long list of extension modules
        assert p.returncode == 2, f"{err[:2500]}\n...\n{err[-1000:]}"
        line = error_line(subprocess.CompletedProcess([], p.returncode, "", err))
        assert "missing.txt" in line and "does not exist" in line, err[-2000:]
        assert line.startswith(f"error: process {failing} failed: ") == (i != failing), line
