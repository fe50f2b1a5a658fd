"""FLOPs: what a device can do at most (its published or derived peak) and what a compiled step
does (XLA's count), for model FLOPs utilisation (MFU = model FLOPs per second / peak).

Peaks of accelerators are the vendors' published dense (no sparsity) matmul figures per JAX
device, in the model's compute dtype: bfloat16 on the tensor cores / MXUs; float32 models on
NVIDIA GPUs count at the TF32 tensor-core peak, since XLA's default matmul precision runs float32
dots as TF32 there, and on TPUs at the bfloat16 peak, since the MXU runs them as bfloat16
passes. A CPU's peak is derived from `lscpu`:

    cores x FMA units per core x float32 lanes per vector x 2 FLOPs per FMA x maximum clock

with the assumptions named in the source text (`peak_flops` returns it beside the number).
"""

from __future__ import annotations

import os
import re
import subprocess

# device_kind substring (lower case, most specific first) -> (name, bfloat16, float32 as run by
# default) in FLOP/s per JAX device. Sources: NVIDIA's H100/H200/A100 datasheets, Google Cloud's
# TPU system architecture pages.
ACCELERATOR_PEAKS: tuple[tuple[str, str, float, float], ...] = (
    ("h100 pcie", "NVIDIA H100 PCIe", 756e12, 378e12),
    ("h100", "NVIDIA H100 SXM", 989e12, 494.7e12),
    ("h200", "NVIDIA H200 SXM", 989e12, 494.7e12),
    ("a100", "NVIDIA A100", 312e12, 156e12),
    ("tpu v4", "TPU v4", 275e12, 275e12),
    ("tpu v5 lite", "TPU v5e", 197e12, 197e12),
    ("tpu v5e", "TPU v5e", 197e12, 197e12),
    ("tpu v5p", "TPU v5p", 459e12, 459e12),
    ("tpu v5", "TPU v5p", 459e12, 459e12),
    ("tpu v6 lite", "TPU v6e (Trillium)", 918e12, 918e12),
    ("tpu v6e", "TPU v6e (Trillium)", 918e12, 918e12),
)

FMA_UNITS_PER_CORE = 2  # Intel since Haswell (server parts), AMD since Zen 2: two FMA pipes


def accelerator_peak(device_kind: str, dtype: str) -> tuple[float, str] | None:
    """(FLOP/s, source) of a GPU/TPU kind in the table, or None when it is not there."""
    kind = device_kind.lower()
    for key, name, bf16, f32 in ACCELERATOR_PEAKS:
        if key in kind:
            if dtype == "bfloat16":
                return bf16, f"published: {name} dense bfloat16 {bf16 / 1e12:g} TFLOP/s"
            how = "TF32 tensor cores" if name.startswith("NVIDIA") else "bfloat16 MXU passes"
            return f32, (f"published: {name} dense float32 as XLA runs it by default ({how}) "
                         f"{f32 / 1e12:g} TFLOP/s")
    return None


def parse_lscpu(text: str) -> dict[str, str]:
    """`lscpu`'s "Key: value" lines as a dict (keys as printed, values stripped)."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def cpu_peak(lscpu_text: str, cpuinfo_text: str = "", usable_cpus: int | None = None
             ) -> tuple[float, str]:
    """(FLOP/s, source) of this host's float32 vector units, from `lscpu` output.

    The clock is lscpu's "CPU max MHz"; virtual machines often hide it, and then the current
    clock of /proc/cpuinfo ("cpu MHz") stands in (said in the source). Lanes: 16 with AVX-512,
    8 with AVX2, 4 otherwise, except on AMD Zen 4 (family 25 with AVX-512), whose 512-bit
    instructions run as two halves on 256-bit units: 8. `usable_cpus` (this process's CPU
    affinity) lowers the core count when it is smaller; SMT threads share a core's units and do
    not count.
    """
    info = parse_lscpu(lscpu_text)
    flags = set(info.get("Flags", "").split())
    sockets = int(info.get("Socket(s)", "1") or 1)
    cores = int(info.get("Core(s) per socket", "0") or 0) * sockets
    threads = int(info.get("Thread(s) per core", "1") or 1)
    notes = []
    if not cores:
        cores = int(info.get("CPU(s)", "1")) // threads
    if usable_cpus is not None and usable_cpus < cores:
        notes.append(f"{usable_cpus} of {cores} cores usable by this process")
        cores = usable_cpus
    zen4 = info.get("Vendor ID") == "AuthenticAMD" and info.get("CPU family") == "25"
    if "avx512f" in flags and not zen4:
        lanes, isa = 16, "AVX-512"
    elif "avx512f" in flags:
        lanes, isa = 8, "AVX-512 on 256-bit units (AMD Zen 4)"
    elif "avx2" in flags:
        lanes, isa = 8, "AVX2"
    else:
        lanes, isa = 4, "SSE"
    per_fma = 2 if "fma" in flags else 1  # without FMA: one multiply or add per lane and unit
    mhz = info.get("CPU max MHz")
    clock = "max clock"
    if not mhz:
        current = re.findall(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo_text, re.MULTILINE)
        if not current:
            raise ValueError("neither lscpu nor /proc/cpuinfo gives a clock frequency")
        mhz = max(current, key=float)
        clock = "current clock from /proc/cpuinfo (lscpu gives no max)"
    hz = float(mhz) * 1e6
    flops = cores * FMA_UNITS_PER_CORE * lanes * per_fma * hz
    model = info.get("Model name", "unknown CPU")
    op = "FMA" if per_fma == 2 else "op"
    source = (f"derived: {model}, {cores} cores x {FMA_UNITS_PER_CORE} FMA units (assumed) x "
              f"{lanes} float32 lanes ({isa}) x {per_fma} FLOPs per {op} x {hz / 1e9:.2f} GHz "
              f"({clock})")
    if notes:
        source += "; " + "; ".join(notes)
    return flops, source


def host_cpu_peak() -> tuple[float, str]:
    """`cpu_peak` of the machine this runs on."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True,
                           env={**os.environ, "LC_ALL": "C"}).stdout
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
    except OSError:
        cpuinfo = ""
    return cpu_peak(lscpu, cpuinfo, len(os.sched_getaffinity(0)))


def peak_flops(platform: str, device_kind: str, dtype: str) -> tuple[float, str] | None:
    """(FLOP/s, source) of one device of `platform` ("cpu", "gpu", "tpu"); None for an
    accelerator kind not in `ACCELERATOR_PEAKS`. On CPU this is the whole host's peak: XLA's
    simulated CPU devices (`--xla_force_host_platform_device_count`) all share it."""
    if platform == "cpu":
        return host_cpu_peak()
    return accelerator_peak(device_kind, dtype)


def compiled_flops(compiled) -> float:
    """XLA's FLOP count of a compiled computation (`jax.stages.Compiled`); a `lax.scan` or
    `while` body counts once, whatever its trip count."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax: one dict per partition
        analysis = analysis[0]
    return float(analysis["flops"])


def lm_training_flops_per_token(matmul_params: int, *, num_layers: int, context: int,
                                attention_dim: int, frozen_params: int = 0) -> float:
    """Model FLOPs of one training token of a decoder-only transformer.

    `matmul_params` counts the weights a token is multiplied with (every parameter except
    embedding lookups: a learned position table, and the token table when the output head is a
    separate matrix), `frozen_params` how many of them are not trained (a LoRA run's base). A
    trained weight costs 6 FLOPs per token (PaLM, appendix B): 2 forward, 2 for the input
    gradient, 2 for its own gradient; a frozen one 4, since no weight gradient is computed (the
    input gradient still is: adapters below it are trained). So full training is 6N and LoRA
    4N + 6 N_lora. Attention adds 12 L T D for `num_layers` L, `context` T and `attention_dim` D
    (heads x head_dim): QK^T and PV, 2 T D each forward, twice that backward, which needs the
    gradients of q, k and v whatever is frozen (counted over all T keys, as PaLM does, not the
    causal half). One saving of a LoRA step is left out: nothing below the first layer's q/k/v
    projections is trained, so their input gradients are not computed either (~1% of the
    figure for 6 layers; tests/test_flops.py checks both against XLA's count).
    """
    trained = matmul_params - frozen_params
    return 6 * trained + 4 * frozen_params + 12 * num_layers * context * attention_dim
