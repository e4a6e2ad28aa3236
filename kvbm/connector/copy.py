"""Copies between an engine's per-layer KV tensors (G1) and the node's arena
slots (G2), on the engine's side of the socket.

Copies go one torch op per (layer, run of consecutive slots): never a Python
loop per block per layer, and never a temporary buffer, so they run at memcpy
speed. `load_in_steps` and `store_in_steps` are the one chunked loop of each
direction, whoever hands out the slots (the node over its socket, or a block
manager in the same process in the benchmarks and unit tests).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from kvbm.errors import GeometryMismatch
from kvbm.layout import ModelGeometry, slot_runs

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(geometry: ModelGeometry) -> torch.dtype:
    return _TORCH_DTYPES[geometry.dtype]


def _word(nbytes: int) -> torch.dtype:
    """Widest integer type dividing a layer's block: torch copies bytes one
    element at a time, so uint8 views copy ~8x slower than int64 views."""
    for dt in (torch.int64, torch.int32, torch.int16):
        if nbytes % dt.itemsize == 0:
            return dt
    return torch.uint8


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
            if t.dtype != torch_dtype(geometry):
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


class ArenaBlocks:
    """A slot array (the arena's bytes) seen as [num_slots, num_layers,
    layer_block_bytes] for copies."""

    def __init__(self, geometry: ModelGeometry, arena: np.ndarray, num_slots: int) -> None:
        if arena.dtype != np.uint8 or arena.size < num_slots * geometry.slot_bytes:
            raise GeometryMismatch("arena is smaller than num_slots * slot_bytes")
        arena = torch.from_numpy(arena)
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
        self.check(kv)
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

    def check(self, kv: EngineKV) -> None:
        if kv.geometry != self.geometry:
            raise GeometryMismatch(
                f"engine geometry {kv.geometry} does not match the arena's {self.geometry}"
            )


def load_in_steps(
    blocks: ArenaBlocks,
    kv: EngineKV,
    keys: Sequence,
    block_ids: Sequence[int],
    prepare: Callable[[Sequence], tuple[list[int], object, bool]],
    complete: Callable[[object], None],
) -> tuple[int, list[object]]:
    """Copy the longest available prefix of `keys` into engine blocks
    `block_ids` (one per key), a step at a time: `prepare(keys)` pins a prefix
    of them -> (slots, its token, whether the step size cut it short), and
    `complete(token)` unpins it, error or not. Returns (blocks loaded, tokens)."""
    ids = _checked_ids(blocks, kv, keys, block_ids)
    loaded, tokens = 0, []
    while loaded < len(keys):
        slots, token, more = prepare(keys[loaded:])
        try:
            if slots:
                blocks.scatter(kv, slots, ids[loaded : loaded + len(slots)])
        finally:
            complete(token)
        tokens.append(token)
        loaded += len(slots)
        if not more:
            break
    return loaded, tokens


def store_in_steps(
    blocks: ArenaBlocks,
    kv: EngineKV,
    keys: Sequence,
    block_ids: Sequence[int],
    step: int,
    prepare: Callable[[Sequence], tuple[list[int], list[int], object]],
    complete: Callable[[object, bool], int],
) -> int:
    """Write engine blocks through to G2, `step` keys at a time (so earlier
    steps can drain to G3 while later ones fill): `prepare(keys)` reserves
    slots -> (slots, positions in keys, token), `complete(token, ok)` commits
    or aborts them. Returns blocks added."""
    ids = _checked_ids(blocks, kv, keys, block_ids)
    added = 0
    for start in range(0, len(keys), step):
        slots, positions, token = prepare(keys[start : start + step])
        ok = False
        try:
            if slots:
                blocks.gather(kv, ids[start:][np.asarray(positions, dtype=np.int64)], slots)
            ok = True
        finally:
            added += complete(token, ok)
    return added


def _checked_ids(
    blocks: ArenaBlocks, kv: EngineKV, keys: Sequence, block_ids: Sequence[int]
) -> np.ndarray:
    blocks.check(kv)
    if len(block_ids) != len(keys):
        raise ValueError("block_ids and keys must have equal length")
    ids = np.asarray(block_ids, dtype=np.int64)
    kv.check_ids(ids)
    return ids
