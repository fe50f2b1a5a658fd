"""Exported image samplers (`genai_jax.serving.export_images`) run by the flax-free loader
(`genai_jax.serving.images`) in a process that never imports flax, `genai_jax.models` or
`genai_jax.nn`, and reproduce `Family.sample` (what `experiments.sample` draws) for the same
seed and labels.

Tolerance: at most 1 uint8 level on at most 1% of the pixels (points: float32 within 1e-5).
The export runs the same traced function as `sample` plus the pixel conversion, but compiled
as another program, whose fusions may round a float32 differently; a pixel whose value sits
at a rounding boundary of `to_uint8` can then move one level. Measured on CPU (jax 0.10.2,
2 cores): bit-identical for all four models here (0 pixels differ).
"""

from __future__ import annotations

import base64
import importlib
import io
import json
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image

from genai_jax.data.pixels import to_uint8
from genai_jax.serving import export
from genai_jax.train import prepare
from tests.conftest import ROOT, overridden
from tests.test_serving import Served

SEED, LABELS = 7, [3, 1, 4, 1, 5, 9]
TINY = {"train.steps": 2, "train.batch_size": 8, "train.steps_per_call": 1,
        "eval.num_samples": 0, "sample.num_samples": 6}
MODELS = {  # name -> (config module, overrides)
    "gan": ("gan_digits", {"model.g_channels": 8, "model.d_channels": 8}),
    "vae": ("vae_digits", {"model.channels": 8, "model.hidden": 32}),
    "diffusion": ("diffusion_digits", {  # DDIM with classifier-free guidance, 4 steps
        "sample.steps": 4, "sample.guidance": 2.0, "model.channels": 8,
        "model.channel_mult": (1,), "model.num_res_blocks": 1, "model.groups": 4,
        "model.attention_max_side": 8, "model.num_heads": 2}),
    "gan_points": ("gan_ring8", {"train.steps_per_call": 1}),  # unconditional, EMA, 2-D
}
ALL_PLATFORMS = ("cpu", "cuda", "tpu")


def write_export(run, out, platforms=("cpu",)) -> dict:
    """`run` exported into `out` (what experiments.export_compiled does)."""
    return export.export_run(run, out, platforms)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """name -> (export dir, manifest, the reference samples of `Family.sample`), for each model
    initialised (untrained: sampling does not care) and exported for the CPU; each is also
    exported for all three platforms ("NAME_all"; lowering only, but the loader runs the
    diffusion one here on the CPU)."""
    out = {}
    for name, (module, overrides) in MODELS.items():
        config = importlib.import_module(f"experiments.configs.{module}").get_config()
        config = overridden(config, {**TINY, **overrides})
        run = prepare(config, tmp_path_factory.mktemp(f"{name}_run"), read_only=True)
        reference = run.family.sample(run.state, jax.random.PRNGKey(SEED), labels=LABELS)["x"]
        if run.pipeline.info["kind"] == "image":
            reference = to_uint8(reference)
        directory = tmp_path_factory.mktemp(f"{name}_export")
        out[name] = (directory, write_export(run, directory), reference)
        directory = tmp_path_factory.mktemp(f"{name}_export_all")
        out[name + "_all"] = (directory, write_export(run, directory, ALL_PLATFORMS), reference)
        if name == "diffusion":  # for the server test: two images of class 3
            twos = run.family.sample(run.state, jax.random.PRNGKey(SEED), labels=[3, 3])["x"]
            out["diffusion_3"] = (None, None, to_uint8(twos))
    return out


LOADED = (*MODELS, "diffusion_all")  # the exports the flax-free process runs


LOADER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from genai_jax.serving.images import ImageGenerator

    exports, seed, labels, results = json.loads(sys.argv[1])
    report = {}
    for name, directory in exports.items():
        generator = ImageGenerator.load(directory)
        generator.warm_up([2])
        images = generator.generate(labels, seed)
        np.save(f"{results}/{name}.npy", images)
        report[name] = {"label_3": generator.label_index("3")}
        if generator.kind == "image":
            report[name]["png"] = generator.png(images[0]).hex()
        for prompt in ("banana", "10", "-1"):
            try:
                generator.label_index(prompt)
            except ValueError as e:
                report[name][prompt] = str(e)
    forbidden = sorted(m for m in sys.modules if m.split(".")[0] == "flax"
                       or m.startswith(("genai_jax.models", "genai_jax.nn")))
    if forbidden:
        sys.exit(f"the loader imported {forbidden}")
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def loaded(exports, env, tmp_path_factory):
    """What a fresh process without the model code generates from every export."""
    results = tmp_path_factory.mktemp("loaded")
    args = [{name: str(exports[name][0]) for name in LOADED}, SEED, LABELS, str(results)]
    proc = subprocess.run([sys.executable, "-c", LOADER, json.dumps(args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return {name: np.load(results / f"{name}.npy") for name in LOADED}, report


@pytest.mark.parametrize("name", LOADED)
def test_export_reproduces_sample_without_model_code(exports, loaded, name):
    _, manifest, reference = exports[name]
    got = loaded[0][name]
    assert got.shape == reference.shape and got.dtype == reference.dtype
    if manifest["image"]["kind"] == "points":
        np.testing.assert_allclose(got, reference, atol=1e-5)
        return
    diff = np.abs(got.astype(np.int32) - reference.astype(np.int32))
    assert diff.max() <= 1 and np.mean(diff > 0) <= 0.01, (diff.max(), np.mean(diff > 0))
    assert got.std() > 0  # not a constant picture


def test_manifest_describes_the_sampler(exports):
    image = exports["diffusion"][1]["image"]
    assert image == {"kind": "image", "shape": [8, 8, 1], "num_classes": 10,
                     "conditional": True, "label_names": [str(i) for i in range(10)],
                     "sampler": {"sampler": "ddim", "steps": 4, "eta": 0.0, "guidance": 2.0,
                                 "guidance_max_t": 1.0, "clip_x0": True,
                                 "prediction": "eps"}}
    entry = exports["diffusion"][1]["functions"]["generate"]
    assert entry["inputs"] == ["uint32[2]", "int32[n]"]
    assert entry["outputs"] == ["uint8[n, 8, 8, 1]"] and entry["platforms"] == ["cpu"]
    points = exports["gan_points"][1]
    assert points["image"]["kind"] == "points" and not points["image"]["conditional"]
    assert points["functions"]["generate"]["outputs"] == ["float32[n, 2]"]
    assert points["image"]["label_names"] is None  # toy data has no class names


@pytest.mark.parametrize("name", MODELS)
def test_export_lowers_for_every_platform(exports, name):
    manifest = exports[name + "_all"][1]
    assert manifest["functions"]["generate"]["platforms"] == list(ALL_PLATFORMS)
    assert manifest["functions"]["generate"] == {**exports[name][1]["functions"]["generate"],
                                                 "platforms": list(ALL_PLATFORMS)}


def test_labels_and_png(loaded):
    images, report = loaded
    for name in ("gan", "vae", "diffusion"):
        assert report[name]["label_3"] == 3
        assert "unknown label 'banana'" in report[name]["banana"]
        assert "out of range" in report[name]["10"] and "out of range" in report[name]["-1"]
        png = Image.open(io.BytesIO(bytes.fromhex(report[name]["png"])))
        np.testing.assert_array_equal(np.asarray(png), images[name][0, ..., 0])
    # unconditional: every prompt is class 0, labels are ignored
    assert report["gan_points"] == {"label_3": 0}


def test_server_answers_images_generations(exports, env):
    """`experiments.serve --export=DIR` of the diffusion model, asked with the openai client:
    PNGs of the prompt's class, the same images as `sample` for the same seed."""
    directory, _, _ = exports["diffusion"]
    served = Served([f"--export={directory}", "--model_name=digits"], env)
    try:
        client = served.client()
        out = client.images.generate(model="digits", prompt="3", n=2,
                                     response_format="b64_json", extra_body={"seed": SEED})
        got = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(d.b64_json))))
                        for d in out.data])
        np.testing.assert_array_equal(got, exports["diffusion_3"][2][..., 0])
        for body, status in (({"model": "digits", "prompt": "banana"}, 400),
                             ({"model": "digits", "prompt": "3", "n": 0}, 400),
                             ({"model": "digits", "prompt": "3", "response_format": "url"}, 400),
                             ({"model": "digits", "prompt": "3", "temperature": 0}, 404)):
            path = ("/v1/completions" if "temperature" in body else "/v1/images/generations")
            code, answer = served.post(path, body)
            assert code == status and "message" in answer["error"], (body, answer)
        assert served.metric("genai_compile_events_total") == served.compiles_at_ready
    finally:
        assert served.stop() == 0
