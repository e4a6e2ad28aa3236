"""Model geometry -> bytes per block, the layout fingerprint, and slot runs.

A block's bytes are that block index in every layer's tensor, concatenated
layer by layer. The node needs only these sizes, never the tensors: the
copies between an engine's tensors and arena slots live on the engine side
(kvbm/connector/copy.py), so the daemon never imports torch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import xxhash

# Engine per-block byte layouts this module can copy. vLLM CPU: one tensor per
# layer, [num_blocks, num_kv_heads, block_size, 2 * head_dim], block dim first.
VLLM_CPU_LAYOUT = "vllm-cpu-v1"
KV_LAYOUTS = (VLLM_CPU_LAYOUT,)

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
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

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {self.kv_layout!r}")

    @cached_property
    def layer_shape(self) -> tuple[int, int, int]:
        """Shape of one block inside one layer's tensor."""
        return (self.num_kv_heads, self.block_size, 2 * self.head_dim)

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
        """Nodes whose fingerprints differ never exchange blocks."""
        text = (
            f"kvbm-layout-v1|layers={self.num_layers}|kv_heads={self.num_kv_heads}"
            f"|head_dim={self.head_dim}|block_size={self.block_size}|dtype={self.dtype}"
            f"|layout={self.kv_layout}"
        )
        return xxhash.xxh3_64_intdigest(text.encode())


def slot_runs(slots: np.ndarray) -> list[tuple[int, int, int]]:
    """(first slot, length, offset in `slots`) for each run of consecutive slots.

    `slots` must be sorted ascending. Allocation hands out the lowest free slots,
    so a batch is usually one or a few runs.
    """
    if slots.size == 0:
        return []
    starts = np.flatnonzero(np.diff(slots) != 1) + 1
    bounds = np.concatenate(([0], starts, [slots.size]))
    return [(int(slots[a]), int(b - a), int(a)) for a, b in itertools.pairwise(bounds)]
