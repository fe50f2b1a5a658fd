"""Block sizes (public) and the static configuration a kernel is traced with (internal)."""

from __future__ import annotations

import dataclasses
import math

from pallas_kernels._blocks import MaskInfo


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the flash-attention kernels; None = the backend's default.

    block_q / block_kv: forward pass. block_q_dkv / block_kv_dkv: the dK/dV kernel (one
    program per key block, looping over query blocks). block_q_dq / block_kv_dq: the dQ kernel
    (one program per query block, looping over key blocks). Sequences are padded internally
    to a multiple of every block size along them, and blocks larger than the (padded)
    sequence are shrunk, so small inputs never pay for large defaults.
    """

    block_q: int | None = None
    block_kv: int | None = None
    block_q_dkv: int | None = None
    block_kv_dkv: int | None = None
    block_q_dq: int | None = None
    block_kv_dq: int | None = None


# Interpret mode: few, large blocks (the interpreter's cost is per grid step and loop trip).
# Triton: the usual FlashAttention-2 tiles for <= 128-wide heads on A100/H100-class GPUs.
# TPU: 128-multiples for the MXU; keys in 128-multiples also satisfy the lane tiling.
_DEFAULTS = {
    "interpret": BlockSizes(128, 128, 128, 128, 128, 128),
    "triton": BlockSizes(128, 64, 64, 64, 64, 64),
    "tpu": BlockSizes(256, 512, 256, 256, 256, 256),
    "tpu_interpret": BlockSizes(256, 512, 256, 256, 256, 256),
}


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _fit(block: int, length: int, backend: str) -> int:
    """Shrinks a block that is longer than the sequence needs, keeping backend constraints."""
    if backend == "triton":
        # Triton tiles are powers of two and tl.dot wants at least 16 rows.
        return max(16, min(block, 1 << max(0, (length - 1).bit_length())))
    if backend in ("tpu", "tpu_interpret"):
        return min(block, _round_up(length, 8))
    return min(block, length)


def resolve_block_sizes(block_sizes: BlockSizes | None, backend: str, q_len: int,
                        kv_len: int) -> BlockSizes:
    """Fills unset fields from the backend's defaults and shrinks blocks to the sequences."""
    given = block_sizes or BlockSizes()
    default = _DEFAULTS[backend]
    out = {}
    for field in dataclasses.fields(BlockSizes):
        value = getattr(given, field.name) or getattr(default, field.name)
        length = q_len if field.name.startswith("block_q") else kv_len
        out[field.name] = _fit(value, length, backend)
    return BlockSizes(**out)


def padded_lengths(bs: BlockSizes, q_len: int, kv_len: int) -> tuple[int, int]:
    """Sequence lengths padded to a multiple of every block size used along them."""
    q_mult = math.lcm(bs.block_q, bs.block_q_dkv, bs.block_q_dq)
    kv_mult = math.lcm(bs.block_kv, bs.block_kv_dkv, bs.block_kv_dq)
    return _round_up(q_len, q_mult), _round_up(kv_len, kv_mult)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Everything static about one flash-attention call (hashable: it keys jit caches)."""

    backend: str
    mask: MaskInfo
    sm_scale: float
    blocks: BlockSizes
    num_heads: int
    num_kv_heads: int

    @property
    def group(self) -> int:
        """Query heads per K/V head (1 = multi-head, num_heads = multi-query)."""
        return self.num_heads // self.num_kv_heads
