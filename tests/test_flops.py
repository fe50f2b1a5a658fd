"""Device peaks (the published table, a CPU's peak from canned `lscpu` output) and the
benchmark's FLOPs per example of an image family against an analytic count.

The analytic count is of a VAE on 2-D points, whose networks are two MLPs: a dense layer of
`m` inputs and `n` outputs costs 2mn FLOPs per example forward, 2mn for its weight gradient and
2mn for its input gradient, which the encoder's first layer does not need (its input is data).
XLA's figure also counts what is not a matmul: activations, biases, the loss and the optimizer
update (amortised over the batch). At width 512 the elementwise work is a few FLOPs per
activation against 6 x 512 per activation in the matmuls (< 1%), and the optimizer's ~20 FLOPs
per parameter over a batch of 1024 add < 1% to the ~6 FLOPs per parameter per example of the
matmuls: the figure must lie within [1, 1.03] times the analytic count.
"""

from __future__ import annotations

import pytest

from genai_jax.evaluation import flops
from tests.conftest import overridden

# `lscpu` of this project's dev VM (AMD Zen 4 under KVM: no "CPU max MHz" line).
LSCPU_ZEN4_VM = """\
Architecture:                            x86_64
CPU(s):                                  2
On-line CPU(s) list:                     0,1
Vendor ID:                               AuthenticAMD
Model name:                              AMD EPYC
CPU family:                              25
Model:                                   17
Thread(s) per core:                      1
Core(s) per socket:                      2
Socket(s):                               1
Flags:                                   fpu sse sse2 ssse3 fma avx avx2 avx512f avx512dq
Hypervisor vendor:                       KVM
"""
CPUINFO_ZEN4_VM = "processor\t: 0\ncpu MHz\t\t: 2596.150\nprocessor\t: 1\ncpu MHz\t\t: 2596.150\n"

LSCPU_XEON = """\
CPU(s):                  112
Vendor ID:               GenuineIntel
Model name:              Intel(R) Xeon(R) Platinum 8480+
CPU family:              6
Thread(s) per core:      2
Core(s) per socket:      56
Socket(s):               1
CPU max MHz:             3800.0000
CPU min MHz:             800.0000
Flags:                   fpu sse2 fma avx avx2 avx512f avx512bw amx_tile
"""

LSCPU_OLD = """\
CPU(s):                  4
Vendor ID:               GenuineIntel
Model name:              Intel(R) Core(TM)2 Quad
Thread(s) per core:      1
Core(s) per socket:      4
Socket(s):               1
CPU max MHz:             2400.0000
Flags:                   fpu sse sse2 ssse3
"""


def test_cpu_peak_from_lscpu():
    peak, source = flops.cpu_peak(LSCPU_ZEN4_VM, CPUINFO_ZEN4_VM)
    # 2 cores x 2 FMA units x 8 lanes (Zen 4 splits 512-bit ops) x 2 x 2.596 GHz
    assert peak == pytest.approx(2 * 2 * 8 * 2 * 2596.150e6)
    assert "AMD EPYC" in source and "current clock" in source and "assumed" in source

    peak, source = flops.cpu_peak(LSCPU_XEON, usable_cpus=8)
    # SMT threads do not count; the affinity mask (8 CPUs) does
    assert peak == pytest.approx(8 * 2 * 16 * 2 * 3.8e9)
    assert "AVX-512" in source and "max clock" in source and "8 of 56 cores" in source
    assert flops.cpu_peak(LSCPU_XEON)[0] == pytest.approx(56 * 2 * 16 * 2 * 3.8e9)

    peak, source = flops.cpu_peak(LSCPU_OLD)
    assert peak == pytest.approx(4 * 2 * 4 * 1 * 2.4e9) and "SSE" in source

    with pytest.raises(ValueError, match="clock"):
        flops.cpu_peak(LSCPU_ZEN4_VM, "")


def test_accelerator_peaks_are_the_published_dense_figures():
    assert flops.accelerator_peak("NVIDIA H100 80GB HBM3", "bfloat16")[0] == 989e12
    assert flops.accelerator_peak("NVIDIA H200", "bfloat16")[0] == 989e12
    assert flops.accelerator_peak("NVIDIA H100 PCIe", "bfloat16")[0] == 756e12
    peak, source = flops.accelerator_peak("NVIDIA A100-SXM4-40GB", "float32")
    assert peak == 156e12 and "TF32" in source
    assert flops.accelerator_peak("TPU v5 lite", "bfloat16")[0] == 197e12
    assert flops.accelerator_peak("TPU v4", "float32")[0] == 275e12
    assert flops.accelerator_peak("Radeon 9000", "bfloat16") is None


def _points_vae_config(**overrides):
    from experiments.configs import vae_digits

    return overridden(vae_digits.get_config(), {
        "data.name": "moons", "data.num_points": 2048, "model.likelihood": "gaussian",
        "model.conditional": False, "model.hidden": 512, "model.mlp_layers": 2,
        "model.latent_dim": 32, "train.batch_size": 1024, "eval.batch_size": 64,
        "eval.num_samples": 0, **overrides})


def _analytic_training_flops(cfg) -> int:
    """Per example: 6mn per dense layer, less the encoder's first input gradient (2mn)."""
    h, layers, latent = cfg.model.hidden, cfg.model.mlp_layers, cfg.model.latent_dim
    mlp = lambda n_in, n_out: [(n_in, h)] + [(h, h)] * (layers - 1) + [(h, n_out)]
    encoder, decoder = mlp(2, 2 * latent), mlp(latent, 2 * 2)  # decoder: mean, log-scale
    return sum(6 * m * n for m, n in encoder + decoder) - 2 * encoder[0][0] * encoder[0][1]


@pytest.mark.parametrize("overrides", [{}, {"train.steps_per_call": 5},
                                       {"train.grad_accum_steps": 4}])
def test_image_flops_per_example_match_an_analytic_count(overrides, tmp_path):
    from experiments.benchmark import train_flops_per_example
    from genai_jax.train import prepare

    cfg = _points_vae_config(**overrides)
    counted = train_flops_per_example(prepare(cfg, tmp_path))
    analytic = _analytic_training_flops(cfg)
    # without the fix, steps_per_call=5 read 5x too low and grad_accum_steps=4 4x too low
    assert 1.0 <= counted / analytic < 1.03, (counted, analytic)


def test_lm_training_flops_per_token_analytic():
    """6 per trained weight, 4 per frozen one (forward + input gradient, no weight gradient),
    12 L T D for attention: a 2-layer model of width 64, context 32, 1000 matmul weights of
    which 900 are frozen (a LoRA run's base) and 100 are adapters."""
    attention = 12 * 2 * 32 * 64
    full = flops.lm_training_flops_per_token(1000, num_layers=2, context=32, attention_dim=64)
    lora = flops.lm_training_flops_per_token(1000, num_layers=2, context=32, attention_dim=64,
                                             frozen_params=900)
    assert full == 6 * 1000 + attention
    assert lora == 4 * 900 + 6 * 100 + attention


@pytest.mark.parametrize("overrides", [
    {},  # full training, tied embeddings (the head is the token table)
    {"model.lora.rank": 8, "model.lora.targets": "all", "model.tie_embeddings": False},
])
def test_lm_flops_per_token_match_xla(overrides, text_file, tmp_path):
    """The benchmark's LM FLOPs against XLA's count of one compiled step. Full training counts
    6N; a LoRA step 4N for the frozen base plus 6 per adapter weight, which XLA confirms: the
    frozen weights' gradients are never computed (6N would read ~1.44x here). One exemption the
    formula does not make: below the first layer's q/k/v projections there is nothing to train
    in a LoRA run (the embedding is frozen), so their input gradients (2 per weight of those
    kernels and of their adapters' A) are not computed either; the count below takes them off.
    The untied token table is a lookup, no matmul. XLA also counts the elementwise work, the
    loss and the optimizer update: at width 256 under 3% (measured 1.013 and 1.016)."""
    from experiments.benchmark import model_flops_per_token, train_flops_per_example
    from genai_jax.train import prepare
    from tests.conftest import tiny_lm_config

    cfg = tiny_lm_config(**{"data.path": str(text_file), "model.embed_dim": 256,
                            "model.num_heads": 4, "model.block_size": 64,
                            "train.batch_size": 8, "model.position": "rotary", **overrides})
    run = prepare(cfg, tmp_path)
    counted = train_flops_per_example(run) / cfg.model.block_size
    analytic = model_flops_per_token(run.state, run.config)
    if run.state.frozen is not None:
        first = run.state.frozen["blocks"][0]["attn"], run.state.params["blocks"][0]["attn"]
        analytic -= 2 * sum(first[0][p]["kernel"][...].size + first[1][p]["lora_a"][...].size
                            for p in ("q", "k", "v"))
    assert 1.0 <= counted / analytic < 1.03, (counted, analytic)
