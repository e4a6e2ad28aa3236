"""Model geometry -> bytes per block, the layout fingerprint, and batched copies
between an engine's per-layer KV tensors (G1) and contiguous block slots.

A block's bytes are that block index in every layer's tensor, concatenated
layer by layer. Copies go one torch op per (layer, run of consecutive slots):
never a Python loop per block per layer, and never a temporary buffer, so they
run at memcpy speed.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import xxhash

from kvbm.errors import GeometryMismatch

# Engine per-block byte layouts this module can copy. vLLM CPU: one tensor per
# layer, [num_blocks, num_kv_heads, block_size, 2 * head_dim], block dim first.
VLLM_CPU_LAYOUT = "vllm-cpu-v1"
KV_LAYOUTS = (VLLM_CPU_LAYOUT,)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PAGE = 4096


def align_up(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


def _word(nbytes: int) -> torch.dtype:
    """Widest integer type dividing a layer's block: torch copies bytes one
    element at a time, so uint8 views copy ~8x slower than int64 views."""
    for dt in (torch.int64, torch.int32, torch.int16):
        if nbytes % dt.itemsize == 0:
            return dt
    return torch.uint8


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
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {self.kv_layout!r}")

    @cached_property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @cached_property
    def layer_shape(self) -> tuple[int, int, int]:
        """Shape of one block inside one layer's tensor."""
        return (self.num_kv_heads, self.block_size, 2 * self.head_dim)

    @cached_property
    def layer_block_bytes(self) -> int:
        h, b, d = self.layer_shape
        return h * b * d * self.torch_dtype.itemsize

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


class EngineKV:
    """An engine's per-layer KV tensors (G1), checked once against the geometry.

    `rows[layer]` views that layer's tensor as [num_blocks, words]: one row per
    block, in the widest integer type that divides it. The engine keeps
    ownership of the tensors.
    """

    def __init__(self, geometry: ModelGeometry, layers: list[torch.Tensor]) -> None:
        if len(layers) != geometry.num_layers:
            raise GeometryMismatch(
                f"engine has {len(layers)} KV layers, geometry says {geometry.num_layers}"
            )
        num_blocks = layers[0].shape[0] if layers else 0
        for i, t in enumerate(layers):
            if tuple(t.shape[1:]) != geometry.layer_shape or t.shape[0] != num_blocks:
                raise GeometryMismatch(
                    f"layer {i} has shape {tuple(t.shape)}, expected "
                    f"({num_blocks}, {', '.join(map(str, geometry.layer_shape))})"
                )
            if t.dtype != geometry.torch_dtype:
                raise GeometryMismatch(f"layer {i} has dtype {t.dtype}, expected {geometry.dtype}")
            if not t.is_contiguous() or t.device.type != "cpu":
                raise GeometryMismatch(f"layer {i} must be a contiguous CPU tensor")
        self.geometry = geometry
        self.num_blocks = num_blocks
        word = _word(geometry.layer_block_bytes)
        per_row = geometry.layer_block_bytes // word.itemsize
        self.rows = [t.view(torch.uint8).view(word).view(num_blocks, per_row) for t in layers]

    def check_ids(self, block_ids: np.ndarray) -> None:
        if block_ids.size and (block_ids.min() < 0 or block_ids.max() >= self.num_blocks):
            raise ValueError(f"engine block ids must be in [0, {self.num_blocks})")


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


class ArenaBlocks:
    """A slot array seen as [num_slots, num_layers, layer_block_bytes] for copies."""

    def __init__(self, geometry: ModelGeometry, arena: torch.Tensor, num_slots: int) -> None:
        if arena.dtype != torch.uint8 or arena.numel() < num_slots * geometry.slot_bytes:
            raise GeometryMismatch("arena is smaller than num_slots * slot_bytes")
        self.geometry = geometry
        word = _word(geometry.layer_block_bytes)
        w = word.itemsize
        self.view = torch.as_strided(
            arena[: num_slots * geometry.slot_bytes].view(word),
            (num_slots, geometry.num_layers, geometry.layer_block_bytes // w),
            (geometry.slot_bytes // w, geometry.layer_block_bytes // w, 1),
        )

    def gather(
        self, kv: EngineKV, block_ids: Sequence[int] | np.ndarray, slots: Sequence[int] | np.ndarray
    ) -> None:
        """G1 -> arena: engine block block_ids[i] into slot slots[i]."""
        self._copy(kv, block_ids, slots, to_arena=True)

    def scatter(
        self, kv: EngineKV, slots: Sequence[int] | np.ndarray, block_ids: Sequence[int] | np.ndarray
    ) -> None:
        """Arena -> G1: slot slots[i] into engine block block_ids[i]."""
        self._copy(kv, block_ids, slots, to_arena=False)

    def _copy(
        self,
        kv: EngineKV,
        block_ids: Sequence[int] | np.ndarray,
        slots: Sequence[int] | np.ndarray,
        to_arena: bool,
    ) -> None:
        """One torch op per layer per run of consecutive indices, on whichever side
        (engine blocks or slots) has fewer runs; the other side is indexed."""
        self._check(kv)
        b = np.asarray(block_ids, dtype=np.int64)
        s = np.asarray(slots, dtype=np.int64)
        if b.shape != s.shape or b.ndim != 1:
            raise ValueError("block_ids and slots must be 1-D and of equal length")
        kv.check_ids(b)
        if s.size and (s.min() < 0 or s.max() >= self.view.shape[0]):
            raise ValueError(f"slots must be in [0, {self.view.shape[0]})")
        by_slot = np.argsort(s, kind="stable")
        by_block = np.argsort(b, kind="stable")
        slot_side = slot_runs(s[by_slot])
        block_side = slot_runs(b[by_block])
        # On a tie, index_select writing a contiguous run is the faster op.
        if len(slot_side) < len(block_side) or (len(slot_side) == len(block_side) and to_arena):
            other = torch.from_numpy(b[by_slot])
            for first, n, off in slot_side:
                ids = other[off : off + n]
                for layer, rows in enumerate(kv.rows):
                    run = self.view[first : first + n, layer]
                    if to_arena:
                        torch.index_select(rows, 0, ids, out=run)
                    else:
                        rows.index_copy_(0, ids, run)
        else:
            other = torch.from_numpy(s[by_block])
            for first, n, off in block_side:
                ids = other[off : off + n]
                for layer, rows in enumerate(kv.rows):
                    run = rows[first : first + n]
                    if to_arena:
                        self.view[:, layer].index_copy_(0, ids, run)
                    else:
                        torch.index_select(self.view[:, layer], 0, ids, out=run)

    def _check(self, kv: EngineKV) -> None:
        if kv.geometry != self.geometry:
            raise GeometryMismatch(
                f"engine geometry {kv.geometry} does not match the arena's {self.geometry}"
            )
