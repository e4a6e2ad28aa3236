"""Copies between an engine's KV cache (G1) and the node's arena slots (G2),
on the engine's side of the socket.

vLLM hands a connector one [B, H, N, C] view per layer, strided as its
layout says (kvbm/layout.py), all of them views of one buffer. `EngineKV`
sees them as few strided arrays, each [blocks, *axes] with the axes in the
engine's memory order, which is the arena's order: one array for every layer
when the layers sit in one buffer a fixed stride apart (vLLM's case), one
per layer otherwise. A copy is then one torch op per array per run of
consecutive slots or blocks: never a Python loop per block per layer.

On the CPU the ops copy between the tensors and the arena directly. A device
cache goes through a staging buffer on the device (`StagedCopies`): one
gather or scatter kernel per array, and one DMA per run of slots between the
staging buffer and the arena (pinned by kvbm/connector/cuda.py). The same
code runs, and is tested, with CPU tensors. `load_in_steps` and
`store_in_steps` are the one chunked loop of each direction, whoever hands
out the slots (the node over its socket, or a block manager in the same
process in the benchmarks and unit tests).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvbm.errors import GeometryMismatch
from kvbm.layout import ModelGeometry, slot_runs

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_WORDS = (torch.int64, torch.int32, torch.int16, torch.uint8)


def torch_dtype(geometry: ModelGeometry) -> torch.dtype:
    return _TORCH_DTYPES[geometry.dtype]


def _word(*nbytes: int) -> torch.dtype:
    """Widest integer type dividing every one of `nbytes`: torch copies one
    element at a time, so uint8 views copy ~8x slower than int64 views."""
    for dt in _WORDS:
        if all(n % dt.itemsize == 0 for n in nbytes):
            return dt
    return torch.uint8


def _words_of(
    storage: torch.UntypedStorage, word: torch.dtype, device: torch.device
) -> torch.Tensor:
    flat = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
    return flat[: flat.numel() // word.itemsize * word.itemsize].view(word)


@dataclass(frozen=True)
class _Part:
    """One strided array of the engine's KV: `engine` is [blocks, *shape];
    its bytes of a block sit in a slot at word offset `offset`, dense."""

    engine: torch.Tensor
    offset: int
    shape: tuple[int, ...]
    axes: str  # names of the axes of `shape`

    def layer(self, i: int, layer_words: int) -> _Part:
        """Layer i of a part whose outermost axis is L."""
        return _Part(
            self.engine[:, i], self.offset + i * layer_words, self.shape[1:], self.axes[1:]
        )


class EngineKV:
    """An engine's KV cache (G1), checked once against the geometry.

    `parts` cover every byte of a block once, in the arena's order (the
    layout's, kvbm/layout.py). `layers[i]` is layer i's share of them, where
    a block's layers are apart in the arena (every layout but BHLNC), so a
    load can hand the forward its first layers before the last are copied.
    vLLM may split a block into `kernel_split` kernel blocks of fewer
    tokens (shape[0] of each view counts those): N is then (R, N / R), R
    outermost in memory and N whole in the arena. The engine keeps
    ownership of the tensors; `device` is where they live.
    """

    def __init__(self, geometry: ModelGeometry, layers: list[torch.Tensor]) -> None:
        g = geometry
        if len(layers) != g.num_layers:
            raise GeometryMismatch(
                f"engine has {len(layers)} KV layers, geometry says {g.num_layers}"
            )
        h, n, c = g.layer_shape
        first = layers[0]
        nk = first.shape[2] if first.dim() == 4 and first.shape[2] else n
        ratio = n // nk if n % nk == 0 else 0
        kernel_blocks = first.shape[0] if first.dim() else 0
        for i, t in enumerate(layers):
            if (
                t.dim() != 4
                or (t.shape[1], t.shape[3]) != (h, c)
                or t.shape[2] != nk
                or not ratio
                or t.shape[0] != kernel_blocks
                or kernel_blocks % ratio
            ):
                raise GeometryMismatch(
                    f"layer {i} has shape {tuple(t.shape)}, expected "
                    f"(blocks, {h}, {n}, {c}) as [B, H, N, C] (or blocks split in "
                    f"kernel blocks of fewer tokens)"
                )
            if t.dtype != torch_dtype(g):
                raise GeometryMismatch(f"layer {i} has dtype {t.dtype}, expected {g.dtype}")
            if t.device != first.device:
                raise GeometryMismatch(f"layer {i} is on {t.device}, layer 0 on {first.device}")
            if c > 1 and t.stride(3) != 1:
                raise GeometryMismatch(f"layer {i}: a head's K and V (C) must be contiguous")
            if any(s <= 0 for s, size in zip(t.stride(), t.shape, strict=True) if size > 1):
                raise GeometryMismatch(f"layer {i} has strides {t.stride()}: views overlap")
        self.geometry = g
        self.device = first.device
        self.kernel_split = ratio
        self.num_blocks = kernel_blocks // ratio
        item = first.element_size()
        strides = {tuple(s * item for s in t.stride()) for t in layers}
        offsets = [t.storage_offset() * item for t in layers]
        outer = itertools.chain.from_iterable(st[:3] for st in strides)  # C is contiguous
        self.word = _word(c * item, g.layer_block_bytes, *offsets, *outer)
        w = self.word.itemsize
        ptrs = {t.untyped_storage().data_ptr() for t in layers}
        step = offsets[1] - offsets[0] if len(layers) > 1 else 0
        stacked = (
            len(ptrs) == 1
            and len(strides) == 1
            and (len(layers) == 1 or step > 0)
            and all(o - offsets[0] == i * step for i, o in enumerate(offsets))
        )

        def axes(t: torch.Tensor) -> tuple[int, dict[str, tuple[int, int]]]:
            """(block stride, axes: name -> (size, stride)) of a layer, in words."""
            bs, hs, ns, _ = (s * item // w for s in t.stride())
            return bs * ratio, {
                "R": (ratio, bs),
                "H": (h, hs),
                "N": (nk, ns),
                "C": (c * item // w, 1),
            }

        lw = g.layer_block_bytes // w
        if stacked:
            base = _words_of(first.untyped_storage(), self.word, self.device)
            bs, per_layer = axes(first)
            per_layer["L"] = (len(layers), step // w)
            self.parts = [self._part(base, offsets[0] // w, bs, per_layer, g.block_order, 0)]
        else:
            if not g.block_order.startswith("L"):
                raise GeometryMismatch(
                    f"layout {g.kv_layout} keeps a block's layers together, but the engine's "
                    "layers are separate tensors"
                )
            self.parts = []
            for i, t in enumerate(layers):
                base = _words_of(t.untyped_storage(), self.word, self.device)
                bs, per_layer = axes(t)
                self.parts.append(
                    self._part(base, offsets[i] // w, bs, per_layer, g.block_order[1:], i * lw)
                )
        whole = self.parts[0]
        if len(self.parts) == g.num_layers:
            self.layers: list[_Part] | None = self.parts
        elif whole.axes.startswith("L"):
            self.layers = [whole.layer(i, lw) for i in range(g.num_layers)]
        else:
            self.layers = None

    def _part(
        self,
        base: torch.Tensor,
        start: int,
        block_stride: int,
        axes: dict[str, tuple[int, int]],
        order: str,
        offset: int,
    ) -> _Part:
        """The array [blocks, *axes in `order`], N as (R, N / R); the axes'
        order in memory must be the layout's (R in B's place)."""
        in_memory = sorted(
            (name for name, (size, _) in axes.items() if size > 1),
            key=lambda name: -axes[name][1],
        )
        physical = self.geometry.kv_layout.replace("B", "R")
        want = [a for a in physical if a in in_memory]
        if in_memory != want:
            raise GeometryMismatch(
                f"the engine's KV cache is laid out {''.join(in_memory)} within a block, "
                f"layout {self.geometry.kv_layout} (geometry) says {''.join(want)}"
            )
        names = [a for a in order.replace("N", "RN") if axes[a][0] > 1]
        shape = tuple(axes[a][0] for a in names)
        engine = torch.as_strided(
            base,
            (self.num_blocks, *shape),
            (block_stride, *(axes[a][1] for a in names)),
            start,
        )
        return _Part(engine, offset, shape, "".join(names))

    def check_ids(self, block_ids: np.ndarray) -> None:
        if block_ids.size and (block_ids.min() < 0 or block_ids.max() >= self.num_blocks):
            raise ValueError(f"engine block ids must be in [0, {self.num_blocks})")


def _dense(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, n = [], 1
    for size in reversed(shape):
        strides.append(n)
        n *= size
    return tuple(reversed(strides))


def slot_arrays(
    geometry: ModelGeometry, words: torch.Tensor, parts: list[_Part]
) -> list[torch.Tensor]:
    """`words` (whole slots of geometry.slot_bytes) as one [slots, *shape]
    array per part."""
    per_slot = geometry.slot_bytes // words.element_size()
    num_slots = words.numel() // per_slot
    return [
        torch.as_strided(
            words,
            (num_slots, *p.shape),
            (per_slot, *_dense(p.shape)),
            words.storage_offset() + p.offset,
        )
        for p in parts
    ]


def new_caches(
    geometry: ModelGeometry, num_blocks: int, device: str | torch.device = "cpu"
) -> list[torch.Tensor]:
    """Zeroed per-layer [B, H, N, C] views of one buffer in the geometry's
    layout, as vLLM allocates a cache (for benchmarks and tests)."""
    g = geometry
    h, n, c = g.layer_shape
    sizes = dict(zip("LBHNC", (g.num_layers, num_blocks, h, n, c), strict=True))
    strides, step = {}, 1
    for axis in reversed(g.kv_layout):
        strides[axis] = step
        step *= sizes[axis]
    buf = torch.zeros(step, dtype=torch_dtype(g), device=device)
    whole = torch.as_strided(buf, [sizes[a] for a in "LBHNC"], [strides[a] for a in "LBHNC"])
    return list(whole.unbind(0))


class _Plan:
    """How a batch of (engine block, slot) pairs maps onto runs, worked out
    once per batch: runs on both sides where blocks and slots go up together,
    else runs on whichever side has fewer, the other side indexed."""

    def __init__(self, b: np.ndarray, s: np.ndarray, to_arena: bool) -> None:
        self.to_arena = to_arena
        by_slot = np.argsort(s, kind="stable")
        sb, ss = b[by_slot], s[by_slot]
        joint = _joint_runs(sb, ss)
        slot_side = slot_runs(ss)
        by_block = np.argsort(b, kind="stable")
        block_side = slot_runs(b[by_block])
        if len(joint) <= min(len(slot_side), len(block_side)):
            self.kind, self.runs, self.index = "joint", joint, torch.from_numpy(sb)
        # On a tie, index_select writing a contiguous run is the faster op.
        elif len(slot_side) < len(block_side) or (len(slot_side) == len(block_side) and to_arena):
            self.kind, self.runs, self.index = "slots", slot_side, torch.from_numpy(sb)
        else:
            self.kind, self.runs, self.index = "blocks", block_side, torch.from_numpy(s[by_block])

    def apply(self, engines: list[torch.Tensor], arenas: list[torch.Tensor]) -> None:
        """One torch op per array per run."""
        for first, n, off in self.runs:
            ids = self.index[off : off + n]
            for engine, arena in zip(engines, arenas, strict=True):
                if self.kind == "joint":
                    block = int(ids[0])
                    ours, theirs = arena[first : first + n], engine[block : block + n]
                    (ours.copy_(theirs) if self.to_arena else theirs.copy_(ours))
                elif self.kind == "slots":
                    run = arena[first : first + n]
                    if self.to_arena:
                        torch.index_select(engine, 0, ids, out=run)
                    else:
                        engine.index_copy_(0, ids, run)
                else:
                    run = engine[first : first + n]
                    if self.to_arena:
                        arena.index_copy_(0, ids, run)
                    else:
                        torch.index_select(arena, 0, ids, out=run)


class ArenaBlocks:
    """The arena's slots, seen per engine as that engine's parts, for copies
    between CPU tensors and slots."""

    def __init__(self, geometry: ModelGeometry, arena: np.ndarray, num_slots: int) -> None:
        if arena.dtype != np.uint8 or arena.size < num_slots * geometry.slot_bytes:
            raise GeometryMismatch("arena is smaller than num_slots * slot_bytes")
        self.geometry = geometry
        self.num_slots = num_slots
        self.bytes = torch.from_numpy(arena[: num_slots * geometry.slot_bytes])
        self._seen: tuple[EngineKV, list[torch.Tensor], list[torch.Tensor]] | None = None

    def gather(
        self, kv: EngineKV, block_ids: Sequence[int] | np.ndarray, slots: Sequence[int] | np.ndarray
    ) -> None:
        """G1 -> arena: engine block block_ids[i] into slot slots[i]."""
        plan, parts, _ = self._plan(kv, block_ids, slots, to_arena=True)
        plan.apply([p.engine for p in kv.parts], parts)

    def scatter(
        self, kv: EngineKV, slots: Sequence[int] | np.ndarray, block_ids: Sequence[int] | np.ndarray
    ) -> None:
        """Arena -> G1: slot slots[i] into engine block block_ids[i]."""
        plan, parts, _ = self._plan(kv, block_ids, slots, to_arena=False)
        plan.apply([p.engine for p in kv.parts], parts)

    def scatter_layers(
        self, kv: EngineKV, slots: Sequence[int] | np.ndarray, block_ids: Sequence[int] | np.ndarray
    ) -> Iterator[int]:
        """`scatter` a layer at a time where the layout keeps layers apart
        (else all at once): yields how many layers are in place."""
        plan, parts, layers = self._plan(kv, block_ids, slots, to_arena=False)
        if not layers:
            plan.apply([p.engine for p in kv.parts], parts)
            yield self.geometry.num_layers
            return
        for i, (layer, arena) in enumerate(zip(kv.layers or [], layers, strict=True)):
            plan.apply([layer.engine], [arena])
            yield i + 1

    def _plan(
        self,
        kv: EngineKV,
        block_ids: Sequence[int] | np.ndarray,
        slots: Sequence[int] | np.ndarray,
        to_arena: bool,
    ) -> tuple[_Plan, list[torch.Tensor], list[torch.Tensor]]:
        """A checked batch's plan, and the slots seen as `kv`'s parts and as
        its layers (empty where they are not apart); cached per engine."""
        self.check(kv)
        if kv.device.type != "cpu":
            raise GeometryMismatch(f"the engine's KV is on {kv.device}: copy it through staging")
        if self._seen is None or self._seen[0] is not kv:
            words = self.bytes.view(kv.word)
            layers = slot_arrays(self.geometry, words, kv.layers) if kv.layers else []
            self._seen = (kv, slot_arrays(self.geometry, words, kv.parts), layers)
        b, s = _checked_pairs(kv, block_ids, slots, self.num_slots)
        return _Plan(b, s, to_arena), self._seen[1], self._seen[2]

    def check(self, kv: EngineKV) -> None:
        if kv.geometry != self.geometry:
            raise GeometryMismatch(
                f"engine geometry {kv.geometry} does not match the arena's {self.geometry}"
            )


class StagedCopies:
    """Copies for a cache the CPU cannot address (a GPU's): blocks go
    through `staging`, a buffer of whole slots on the engine's device. A
    store gathers the blocks into it, one kernel per part, then moves each
    run of slots to the arena in one transfer; a load does the reverse.
    Torch orders the ops on the current stream; with `non_blocking` and a
    pinned arena the transfers are asynchronous DMAs. A batch larger than
    the buffer goes in chunks, in order on the same stream."""

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
        self,
        block_ids: Sequence[int] | np.ndarray,
        slots: Sequence[int] | np.ndarray,
        after_reads: Callable[[], None] | None = None,
    ) -> None:
        """G1 -> arena, through staging; `after_reads` is called once the
        last kernel reading G1 is queued."""
        chunks = self._chunks(block_ids, slots)
        for k, (b, s, ids) in enumerate(chunks):
            for part, stage in zip(self.kv.parts, self.stage_parts, strict=True):
                torch.index_select(part.engine, 0, ids, out=stage[: len(b)])
            if after_reads is not None and k == len(chunks) - 1:
                after_reads()
            for first, n, off in slot_runs(s):
                self.arena[first : first + n].copy_(
                    self.staging[off : off + n], non_blocking=self.non_blocking
                )

    def scatter(
        self, slots: Sequence[int] | np.ndarray, block_ids: Sequence[int] | np.ndarray
    ) -> None:
        """Arena -> G1, through staging."""
        for _ in self.scatter_layers(slots, block_ids):
            pass

    def scatter_layers(
        self, slots: Sequence[int] | np.ndarray, block_ids: Sequence[int] | np.ndarray
    ) -> Iterator[int]:
        """`scatter`, yielding how many layers are in place once the last
        chunk's kernel for them is queued (a layer at a time where the layout
        keeps layers apart, else all at once)."""
        chunks = self._chunks(block_ids, slots)
        if not chunks:
            yield self.kv.geometry.num_layers
        for k, (b, s, ids) in enumerate(chunks):
            for first, n, off in slot_runs(s):
                self.staging[off : off + n].copy_(
                    self.arena[first : first + n], non_blocking=self.non_blocking
                )
            last = k == len(chunks) - 1
            if self.stage_layers and self.kv.layers:
                for i, (layer, stage) in enumerate(
                    zip(self.kv.layers, self.stage_layers, strict=True)
                ):
                    layer.engine.index_copy_(0, ids, stage[: len(b)])
                    if last:
                        yield i + 1
            else:
                for part, stage in zip(self.kv.parts, self.stage_parts, strict=True):
                    part.engine.index_copy_(0, ids, stage[: len(b)])
                if last:
                    yield self.kv.geometry.num_layers

    def _chunks(
        self, block_ids: Sequence[int] | np.ndarray, slots: Sequence[int] | np.ndarray
    ) -> list[tuple[np.ndarray, np.ndarray, torch.Tensor]]:
        """Pairs sorted by slot (staging row i <-> the i-th slot of a chunk),
        `capacity` at most per chunk, with their block ids on the device."""
        b, s = _checked_pairs(self.kv, block_ids, slots, self.blocks.num_slots)
        order = np.argsort(s, kind="stable")
        b, s = b[order], s[order]
        out = []
        for at in range(0, len(b), self.capacity):
            cb, cs = b[at : at + self.capacity], s[at : at + self.capacity]
            ids = torch.from_numpy(cb)
            if self.non_blocking:  # from pageable memory the copy could wait on the stream
                ids = ids.pin_memory()
            ids = ids.to(self.kv.device, non_blocking=self.non_blocking)
            out.append((cb, cs, ids))
        return out


def _checked_pairs(
    kv: EngineKV,
    block_ids: Sequence[int] | np.ndarray,
    slots: Sequence[int] | np.ndarray,
    num_slots: int,
) -> tuple[np.ndarray, np.ndarray]:
    b = np.asarray(block_ids, dtype=np.int64)
    s = np.asarray(slots, dtype=np.int64)
    if b.shape != s.shape or b.ndim != 1:
        raise ValueError("block_ids and slots must be 1-D and of equal length")
    kv.check_ids(b)
    if s.size and (s.min() < 0 or s.max() >= num_slots):
        raise ValueError(f"slots must be in [0, {num_slots})")
    return b, s


def _joint_runs(blocks: np.ndarray, slots: np.ndarray) -> list[tuple[int, int, int]]:
    """(first slot, length, offset) of each run where slots and blocks (both
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
