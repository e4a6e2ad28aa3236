"""An engine's KV cache (G1) as the copies see it: few strided arrays, checked
once against the model geometry, in the arena's order.

vLLM hands a connector one [B, H, N, C] view per layer, strided as its
layout says (kvbm/layout.py), all of them views of one buffer. `EngineKV`
sees them as few strided arrays, each [blocks, *axes] with the axes in the
engine's memory order, which is the arena's order: one array for every layer
when the layers sit in one buffer a fixed stride apart (vLLM's case), one
per layer otherwise. `slot_arrays` sees the arena's slots in the same
shapes, so a copy (kvbm/connector/copy.py) is one torch op per array per run.

With vLLM's hybrid KV cache manager, a model's layers come in KV cache
groups (full attention, sliding window), each with block ids of its own:
the same position of a prompt is block 7 in one group and block 12 in
another. A slot still holds every layer of its position, in layer order
(as the same model's block without the hybrid manager: engines with it on
and off share blocks); each array belongs to one group, and a copy takes
block ids per group.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np
import torch

from kvbm.errors import GeometryMismatch
from kvbm.layout import PACKED_MODES, ModelGeometry

_TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e4m3fnuz": torch.float8_e4m3fnuz,
    "float8_e5m2": torch.float8_e5m2,
    **{f"packed-{mode}": torch.uint8 for mode in PACKED_MODES},
}
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
    group: int = 0  # the KV cache group whose block ids index `engine`

    def layer(self, i: int, layer_words: int) -> _Part:
        """Layer i of a part whose outermost axis is L."""
        return _Part(
            self.engine[:, i],
            self.offset + i * layer_words,
            self.shape[1:],
            self.axes[1:],
            self.group,
        )


class EngineKV:
    """An engine's KV cache (G1), checked once against the geometry.

    `parts` cover every byte of the engine's layers of a block once (a
    pipeline stage of fewer layers than the geometry's leaves `unused`
    after them), in copy order: group by group
    (`groups[i]` is layer i's KV cache group, all 0 without vLLM's hybrid
    manager), each group's in the arena's order (the layout's,
    kvbm/layout.py). `layers[k]` is layer `layer_order[k]`'s share of them,
    in the same order, where a block's layers are apart in the arena (every
    layout but BHLNC), so a load can hand the forward its first layers
    before the last are copied.
    vLLM may split a block into `kernel_split` kernel blocks of fewer
    tokens (shape[0] of each view counts those): N is then (R, N / R), R
    outermost in memory and N whole in the arena. The engine keeps
    ownership of the tensors; `device` is where they live.
    """

    def __init__(
        self,
        geometry: ModelGeometry,
        layers: list[torch.Tensor],
        groups: list[int] | None = None,
        stage: bool = False,
    ) -> None:
        """`stage`: the layers are a pipeline stage's, which may be fewer
        than the geometry's (stages of unequal layer counts)."""
        g = geometry
        if not 0 < len(layers) <= g.num_layers or (len(layers) < g.num_layers and not stage):
            raise GeometryMismatch(
                f"engine has {len(layers)} KV layers, geometry says {g.num_layers}"
            )
        self.groups = list(groups) if groups is not None else [0] * len(layers)
        self.num_groups = max(self.groups) + 1
        if len(self.groups) != len(layers) or set(self.groups) != set(range(self.num_groups)):
            raise GeometryMismatch(f"KV cache groups {self.groups} do not number the layers")
        # group by group, each group's layers in order (a stable sort)
        self.layer_order = sorted(range(len(layers)), key=lambda i: self.groups[i])
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
            if t.dtype != torch_dtype(g) and not (
                (t.dtype == torch.uint8 and g.dtype.startswith("float8"))  # vLLM's fp8 caches
                or (t.dtype == torch.int8 and g.dtype.startswith("packed-"))  # its int8 pages
            ):
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
            self.num_groups == 1  # the groups' blocks are numbered apart
            and len(ptrs) == 1
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
                    "layers are separate tensors (or in KV cache groups of their own)"
                )
            self.parts = []
            for i in self.layer_order:
                t = layers[i]
                base = _words_of(t.untyped_storage(), self.word, self.device)
                bs, per_layer = axes(t)
                part = self._part(base, offsets[i] // w, bs, per_layer, g.block_order[1:], i * lw)
                self.parts.append(dataclasses.replace(part, group=self.groups[i]))
        # A pipeline stage of fewer layers than the geometry's fills the
        # first slot layers; `unused` is the rest of the block, in words,
        # which a save zeroes (another stage's layers were there before).
        self.unused: tuple[int, int] | None = None
        if len(layers) < g.num_layers:
            if not g.block_order.startswith("L"):
                raise GeometryMismatch(
                    f"layout {g.kv_layout} keeps a block's layers together: an engine of "
                    f"{len(layers)} of its {g.num_layers} layers cannot fill a slot"
                )
            self.unused = (len(layers) * lw, (g.num_layers - len(layers)) * lw)
        whole = self.parts[0]
        if len(self.parts) == len(layers):
            self.layers: list[_Part] | None = self.parts
        elif whole.axes.startswith("L"):
            self.layers = [whole.layer(i, lw) for i in range(len(layers))]
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
        """Block ids, one row per group: each in [0, num_blocks), or -1
        where a group has no block at that pair (behind its window)."""
        if block_ids.size and (block_ids.min() < -1 or block_ids.max() >= self.num_blocks):
            raise ValueError(f"engine block ids must be in [0, {self.num_blocks}) or -1")


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
