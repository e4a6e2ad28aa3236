"""Copies between an engine's KV cache (G1) and the node's arena slots (G2),
on the engine's side of the socket.

The engine's cache is seen as few strided arrays (`EngineKV`,
kvbm/connector/engine_kv.py) and the arena's slots in the same shapes, so a
copy is one torch op per array per span of consecutive slots or blocks: never
a Python loop per block per layer.

On the CPU the ops copy between the tensors and the arena directly. A device
cache goes through a staging buffer on the device (`StagedCopies`): one
gather or scatter kernel per array, and one DMA per span of slots between the
staging buffer and the arena (pinned by kvbm/connector/cuda.py). The same
code runs, and is tested, with CPU tensors. `load_in_steps` and
`store_in_steps` are the one chunked loop of each direction, whoever hands
out the slots (the node over its socket, or a block manager in the same
process in the benchmarks and unit tests).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from kvbm.connector.engine_kv import EngineKV, slot_arrays
from kvbm.errors import GeometryMismatch
from kvbm.layout import ModelGeometry, slot_spans

Ids = Sequence[int] | Sequence[Sequence[int]] | np.ndarray


class _Plan:
    """How a batch of (engine block, slot) pairs maps onto spans, worked out
    once per batch: spans on both sides where blocks and slots go up together,
    else spans on whichever side has fewer, the other side indexed."""

    def __init__(self, b: np.ndarray, s: np.ndarray, to_arena: bool) -> None:
        self.to_arena = to_arena
        by_slot = np.argsort(s, kind="stable")
        sb, ss = b[by_slot], s[by_slot]
        joint = _joint_spans(sb, ss)
        slot_side = slot_spans(ss)
        by_block = np.argsort(b, kind="stable")
        block_side = slot_spans(b[by_block])
        if len(joint) <= min(len(slot_side), len(block_side)):
            self.kind, self.spans, self.index = "joint", joint, torch.from_numpy(sb)
        # On a tie, index_select writing a contiguous span is the faster op.
        elif len(slot_side) < len(block_side) or (len(slot_side) == len(block_side) and to_arena):
            self.kind, self.spans, self.index = "slots", slot_side, torch.from_numpy(sb)
        else:
            self.kind, self.spans, self.index = "blocks", block_side, torch.from_numpy(s[by_block])

    def apply(self, engines: list[torch.Tensor], arenas: list[torch.Tensor]) -> None:
        """One torch op per array per span."""
        for first, n, off in self.spans:
            ids = self.index[off : off + n]
            for engine, arena in zip(engines, arenas, strict=True):
                if self.kind == "joint":
                    block = int(ids[0])
                    ours, theirs = arena[first : first + n], engine[block : block + n]
                    (ours.copy_(theirs) if self.to_arena else theirs.copy_(ours))
                elif self.kind == "slots":
                    span = arena[first : first + n]
                    if self.to_arena:
                        torch.index_select(engine, 0, ids, out=span)
                    else:
                        engine.index_copy_(0, ids, span)
                else:
                    span = engine[first : first + n]
                    if self.to_arena:
                        arena.index_copy_(0, ids, span)
                    else:
                        torch.index_select(arena, 0, ids, out=span)


class ArenaBlocks:
    """The arena's slots, seen per engine as that engine's parts, for copies
    between CPU tensors and slots. Block ids come one row per KV cache
    group (a 1-D list for an engine of one group); -1 where a group has no
    block at a pair, which that group's layers then skip."""

    def __init__(self, geometry: ModelGeometry, arena: np.ndarray, num_slots: int) -> None:
        if arena.dtype != np.uint8 or arena.size < num_slots * geometry.slot_bytes:
            raise GeometryMismatch("arena is smaller than num_slots * slot_bytes")
        self.geometry = geometry
        self.num_slots = num_slots
        self.bytes = torch.from_numpy(arena[: num_slots * geometry.slot_bytes])
        self._seen: tuple[EngineKV, list[torch.Tensor], list[torch.Tensor]] | None = None

    def gather(self, kv: EngineKV, block_ids: Ids, slots: Ids) -> None:
        """G1 -> arena: engine block block_ids[g][i] into slot slots[i]."""
        for _ in self._copy(kv, block_ids, slots, to_arena=True, by_layer=False):
            pass

    def scatter(self, kv: EngineKV, slots: Ids, block_ids: Ids) -> None:
        """Arena -> G1: slot slots[i] into engine block block_ids[g][i]."""
        for _ in self._copy(kv, block_ids, slots, to_arena=False, by_layer=False):
            pass

    def scatter_layers(self, kv: EngineKV, slots: Ids, block_ids: Ids) -> Iterator[int]:
        """`scatter` a layer at a time where the layout keeps layers apart
        (else all at once): yields how many of `kv.layers` are in place."""
        return self._copy(kv, block_ids, slots, to_arena=False, by_layer=True)

    def _copy(
        self, kv: EngineKV, block_ids: Ids, slots: Ids, to_arena: bool, by_layer: bool
    ) -> Iterator[int]:
        """One plan per group, applied to the group's parts (or layers, one
        at a time, yielding how many are in place)."""
        self.check(kv)
        if kv.device.type != "cpu":
            raise GeometryMismatch(f"the engine's KV is on {kv.device}: copy it through staging")
        if self._seen is None or self._seen[0] is not kv:
            words = self.bytes.view(kv.word)
            layers = slot_arrays(self.geometry, words, kv.layers) if kv.layers else []
            self._seen = (kv, slot_arrays(self.geometry, words, kv.parts), layers)
        b, s = _checked_pairs(kv, block_ids, slots, self.num_slots)
        by_layer = by_layer and bool(kv.layers)
        units = kv.layers if by_layer and kv.layers else kv.parts
        arenas = self._seen[2] if by_layer else self._seen[1]
        if to_arena and kv.unused is not None:  # another stage's layers were there
            start, n = kv.unused
            rows = self.bytes.view(kv.word).view(self.num_slots, -1)
            rows[torch.from_numpy(s), start : start + n] = 0
        done = 0
        for g in range(kv.num_groups):
            has = b[g] >= 0
            plan = _Plan(b[g][has], s[has], to_arena)
            for unit, arena in zip(units, arenas, strict=True):
                if unit.group == g:
                    plan.apply([unit.engine], [arena])
                    done += 1
                    if by_layer:
                        yield done
        if not by_layer:
            yield self.geometry.num_layers

    def check(self, kv: EngineKV) -> None:
        if kv.geometry != self.geometry:
            raise GeometryMismatch(
                f"engine geometry {kv.geometry} does not match the arena's {self.geometry}"
            )


class StagedCopies:
    """Copies for a cache the CPU cannot address (a GPU's): blocks go
    through `staging`, a buffer of whole slots on the engine's device. A
    store gathers the blocks into it, one kernel per part, then moves each
    span of slots to the arena in one transfer; a load does the reverse.
    Every KV cache group's layers of a slot meet in the same staging row, so
    a slot moves whole, once. Torch orders the ops on the current stream;
    with `non_blocking` and a pinned arena the transfers are asynchronous
    DMAs. A batch larger than the buffer goes in chunks, in order on the
    same stream."""

    def __init__(self, blocks: ArenaBlocks, kv: EngineKV, capacity: int) -> None:
        blocks.check(kv)
        self.blocks, self.kv = blocks, kv
        g = kv.geometry
        per_slot = g.slot_bytes // kv.word.itemsize
        # zeros: a slot's padding goes to the arena with it
        self.staging = torch.zeros((capacity, per_slot), dtype=kv.word, device=kv.device)
        self.arena = blocks.bytes.view(kv.word).view(blocks.num_slots, per_slot)
        self.stage_parts = slot_arrays(g, self.staging, kv.parts)
        self.stage_layers = slot_arrays(g, self.staging, kv.layers) if kv.layers else []
        self.non_blocking = kv.device.type != "cpu"

    @property
    def capacity(self) -> int:
        return self.staging.shape[0]

    def gather(
        self, block_ids: Ids, slots: Ids, after_reads: Callable[[], None] | None = None
    ) -> None:
        """G1 -> arena, through staging; `after_reads` is called once the
        last kernel reading G1 is queued."""
        chunks = self._chunks(block_ids, slots)
        for k, (s, rows) in enumerate(chunks):
            for part, stage in zip(self.kv.parts, self.stage_parts, strict=True):
                ids, at = rows[part.group]
                if at is None:
                    torch.index_select(part.engine, 0, ids, out=stage[: len(s)])
                else:
                    stage.index_copy_(0, at, torch.index_select(part.engine, 0, ids))
            if after_reads is not None and k == len(chunks) - 1:
                after_reads()
            if self.kv.unused is not None:  # a load left another block's layers there
                start, n = self.kv.unused
                self.staging[: len(s), start : start + n].zero_()
            for first, n, off in slot_spans(s):
                self.arena[first : first + n].copy_(
                    self.staging[off : off + n], non_blocking=self.non_blocking
                )

    def scatter(self, slots: Ids, block_ids: Ids) -> None:
        """Arena -> G1, through staging."""
        for _ in self.scatter_layers(slots, block_ids):
            pass

    def scatter_layers(self, slots: Ids, block_ids: Ids) -> Iterator[int]:
        """`scatter`, yielding how many of `kv.layers` are in place once the
        last chunk's kernel for them is queued (a layer at a time where the
        layout keeps layers apart, else all at once)."""
        chunks = self._chunks(block_ids, slots)
        if not chunks:
            yield self.kv.geometry.num_layers
        by_layer = bool(self.stage_layers and self.kv.layers)
        units = self.kv.layers if by_layer and self.kv.layers else self.kv.parts
        stages = self.stage_layers if by_layer else self.stage_parts
        for k, (s, rows) in enumerate(chunks):
            for first, n, off in slot_spans(s):
                self.staging[off : off + n].copy_(
                    self.arena[first : first + n], non_blocking=self.non_blocking
                )
            last = k == len(chunks) - 1
            for i, (unit, stage) in enumerate(zip(units, stages, strict=True)):
                ids, at = rows[unit.group]
                rows_of = stage[: len(s)] if at is None else stage.index_select(0, at)
                unit.engine.index_copy_(0, ids, rows_of)
                if last and by_layer:
                    yield i + 1
            if last and not by_layer:
                yield self.kv.geometry.num_layers

    def _chunks(
        self, block_ids: Ids, slots: Ids
    ) -> list[tuple[np.ndarray, list[tuple[torch.Tensor, torch.Tensor | None]]]]:
        """Pairs sorted by slot (staging row i <-> the i-th slot of a chunk),
        `capacity` at most per chunk: the chunk's slots, and per group its
        block ids on the device with the staging rows they go with (None:
        every row)."""
        b, s = _checked_pairs(self.kv, block_ids, slots, self.blocks.num_slots)
        order = np.argsort(s, kind="stable")
        b, s = b[:, order], s[order]
        out = []
        for at in range(0, s.size, self.capacity):
            rows = []
            for g in range(self.kv.num_groups):
                cb = b[g, at : at + self.capacity]
                has = cb >= 0
                where = None if has.all() else self._to_device(np.flatnonzero(has))
                rows.append((self._to_device(cb[has]), where))
            out.append((s[at : at + self.capacity], rows))
        return out

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
        if self.non_blocking:  # from pageable memory the copy could wait on the stream
            t = t.pin_memory()
        return t.to(self.kv.device, non_blocking=self.non_blocking)


def _checked_pairs(
    kv: EngineKV, block_ids: Ids, slots: Ids, num_slots: int
) -> tuple[np.ndarray, np.ndarray]:
    """Block ids as [groups, pairs] (a 1-D list is an engine of one group's),
    and the slots, checked."""
    b = np.asarray(block_ids, dtype=np.int64)
    s = np.asarray(slots, dtype=np.int64)
    if b.ndim == 1:
        b = b[None, :]
    if s.ndim != 1 or b.shape != (kv.num_groups, s.size):
        raise ValueError(
            f"block_ids must be {kv.num_groups} row(s) of one id per slot, "
            f"got {b.shape} for {s.shape} slots"
        )
    kv.check_ids(b)
    if s.size and (s.min() < 0 or s.max() >= num_slots):
        raise ValueError(f"slots must be in [0, {num_slots})")
    return b, s


def _joint_spans(blocks: np.ndarray, slots: np.ndarray) -> list[tuple[int, int, int]]:
    """(first slot, length, offset) of each span where slots and blocks (both
    in slot order) go up by one together."""
    if slots.size == 0:
        return []
    breaks = np.flatnonzero((np.diff(slots) != 1) | (np.diff(blocks) != 1)) + 1
    bounds = np.concatenate(([0], breaks, [slots.size]))
    return [(int(slots[a]), int(b - a), int(a)) for a, b in itertools.pairwise(bounds)]


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
