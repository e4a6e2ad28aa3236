"""Model geometry -> bytes per block, the layout fingerprint, and slot spans.

An engine's KV cache is, per layer, a [B, H, N, C] array (blocks, KV heads,
token positions, K then V content) laid out in memory in one of vLLM's
orders of the axes [L, B, H, N, C] (vllm/v1/kv_cache_layout.py): "LBHNC" is
vLLM's CPU layout and FlashInfer's HND, "LBNHC" FlashAttention's NHD, the
B-first ones a cache whose layers sit together inside each block. A block's
bytes in the arena are that block's bytes in the engine's own memory order
(its axes in the layout's order, B left out), so a copy between G1 and G2 is
a few long memcpys in every layout; the layout is in the fingerprint, so
only nodes whose engines agree exchange blocks.

The node needs only these sizes, never the tensors: the copies between an
engine's tensors and arena slots live on the engine side
(kvbm/connector/copy.py), so the daemon never imports torch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import xxhash

# vLLM's KVCacheLayout names: the memory order of the axes [L, B, H, N, C].
KV_LAYOUTS = ("LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC")
VLLM_CPU_LAYOUT = "LBHNC"

# The KV cache's element format. An fp8 cache is named by its format, not
# by vLLM's "fp8" (e4m3 on NVIDIA, e4m3fnuz on ROCm): the same name must mean
# the same bytes on every node. Its per-tensor scales are the checkpoint's
# (in the model's identity), so a block's bytes are all it needs.
DTYPE_BYTES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
}
# Packed pages: vLLM's per-token-head quantized caches keep each head's K
# and V data with their scales inline, C bytes a token position. A block is
# those bytes, scales and all; the packing is named by its mode.
PACKED_MODES = ("int8_per_token_head", "fp8_per_token_head", "int4_per_token_head")
DTYPE_BYTES.update({f"packed-{mode}": 1 for mode in PACKED_MODES})
PAGE = 4096


def align_up(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class ModelGeometry:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str = "float32"
    kv_layout: str = VLLM_CPU_LAYOUT
    # V's width per head (None: head_dim; 0 for MLA's latent: one "head", no V).
    head_dim_v: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        # The default is spelled None, so equal geometries compare equal.
        if self.head_dim_v == self.head_dim:
            object.__setattr__(self, "head_dim_v", None)
        if self.head_dim_v is not None and (
            type(self.head_dim_v) is not int or self.head_dim_v < 0
        ):
            raise ValueError(f"head_dim_v must be an integer >= 0, got {self.head_dim_v!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {self.kv_layout!r}")

    @property
    def v_dim(self) -> int:
        return self.head_dim if self.head_dim_v is None else self.head_dim_v

    @cached_property
    def layer_shape(self) -> tuple[int, int, int]:
        """Logical shape of one block inside one layer: (H, N, C)."""
        return (self.num_kv_heads, self.block_size, self.head_dim + self.v_dim)

    @cached_property
    def block_order(self) -> str:
        """The axes of a block in the arena, outermost first: the layout's
        order without B (N whole, even where vLLM splits blocks into kernel
        blocks of fewer tokens). Axes of size 1 do not change the bytes."""
        return self.kv_layout.replace("B", "")

    @cached_property
    def layer_block_bytes(self) -> int:
        h, b, d = self.layer_shape
        return h * b * d * DTYPE_BYTES[self.dtype]

    @cached_property
    def block_bytes(self) -> int:
        return self.num_layers * self.layer_block_bytes

    @cached_property
    def slot_bytes(self) -> int:
        """Slot stride in the arenas: page aligned so O_DIRECT can read into a slot."""
        return align_up(self.block_bytes)

    @cached_property
    def fingerprint(self) -> int:
        """Nodes whose fingerprints differ never exchange blocks. It names
        the bytes of a block, not the engine's layout: nodes whose engines
        cache layer by layer (LBHNC) and ones whose engines keep each
        block's layers together (BLHNC) store the same bytes and share
        blocks (one node serves one geometry, its layout included). The
        first version's text is kept for the bytes it named (every version
        must agree)."""
        if self.block_order == "LHNC" and self.head_dim_v is None:
            text = (
                f"kvbm-layout-v1|layers={self.num_layers}|kv_heads={self.num_kv_heads}"
                f"|head_dim={self.head_dim}|block_size={self.block_size}|dtype={self.dtype}"
                "|layout=vllm-cpu-v1"
            )
        else:
            text = (
                f"kvbm-layout-v2|layers={self.num_layers}|kv_heads={self.num_kv_heads}"
                f"|head_dim={self.head_dim}|head_dim_v={self.v_dim}"
                f"|block_size={self.block_size}|dtype={self.dtype}"
                f"|order={self.block_order}"
            )
        return xxhash.xxh3_64_intdigest(text.encode())


def slot_spans(slots: np.ndarray) -> list[tuple[int, int, int]]:
    """(first slot, length, offset in `slots`) for each span of consecutive
    slots, which one copy moves.

    `slots` must be sorted ascending. Allocation hands out the lowest free slots,
    so a batch is usually one or a few spans.
    """
    if slots.size == 0:
        return []
    starts = np.flatnonzero(np.diff(slots) != 1) + 1
    bounds = np.concatenate(([0], starts, [slots.size]))
    return [(int(slots[a]), int(b - a), int(a)) for a, b in itertools.pairwise(bounds)]
