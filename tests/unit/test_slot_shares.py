"""Copies of engines whose layers are not one block array of the geometry.

- KV cache groups (vLLM's hybrid manager: full-attention and sliding-window
  layers, each group numbering its blocks apart): a slot holds every layer
  of its position in layer order, the bytes the same model's block holds
  without the hybrid manager; a group with no block at a pair (-1, behind
  its window) leaves its layers of that slot alone.
- A pipeline stage of fewer layers than the geometry's (stages of unequal
  layer counts): it fills the first slot layers, and a save zeroes the rest,
  where another stage's layers were.

The staged copies (a GPU's, here on CPU tensors) move a slot whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvbm.connector.copy import ArenaBlocks, StagedCopies
from kvbm.connector.engine_kv import EngineKV, new_caches
from kvbm.errors import GeometryMismatch
from kvbm.layout import ModelGeometry

GEOMETRY = ModelGeometry(4, 2, 8, 4, "float32")  # LBHNC: vLLM's CPU layout
GROUPS = [0, 1, 0, 1]  # gpt-oss's alternation: full, sliding, full, sliding
BLOCKS, SLOTS = 10, 6


def engine(seed: int | None) -> list[torch.Tensor]:
    """One tensor per layer, as vLLM's hybrid manager allocates them."""
    layers = [new_caches(ModelGeometry(1, 2, 8, 4, "float32"), BLOCKS)[0] for _ in GROUPS]
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        for t in layers:
            t.copy_(torch.randn(t.shape, generator=gen))
    return layers


def arena() -> ArenaBlocks:
    return ArenaBlocks(GEOMETRY, np.zeros(SLOTS * GEOMETRY.slot_bytes, dtype=np.uint8), SLOTS)


def slot_bytes(blocks: ArenaBlocks, slot: int) -> torch.Tensor:
    g = GEOMETRY
    return blocks.bytes[slot * g.slot_bytes : slot * g.slot_bytes + g.block_bytes]


def position_bytes(layers: list[torch.Tensor], ids: list[list[int]], i: int) -> torch.Tensor:
    """Position i's bytes in layer order: each layer's block of its own group."""
    return torch.cat(
        [t[ids[g][i]].reshape(-1).view(torch.uint8) for t, g in zip(layers, GROUPS, strict=True)]
    )


IDS = [[1, 2, 3], [7, 5, 9]]  # per group, one id per position


@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
def test_a_slot_holds_every_groups_layers_in_layer_order(staged):
    src = engine(seed=1)
    kv, blocks = EngineKV(GEOMETRY, src, GROUPS), arena()
    assert kv.num_groups == 2 and kv.layer_order == [0, 2, 1, 3]
    if staged:
        StagedCopies(blocks, kv, capacity=2).gather(IDS, [4, 0, 2])
    else:
        blocks.gather(kv, IDS, [4, 0, 2])
    for i, slot in enumerate([4, 0, 2]):
        assert torch.equal(slot_bytes(blocks, slot), position_bytes(src, IDS, i))
    # the same bytes as the one-group engine whose blocks hold them (hybrid manager off)
    flat = [torch.stack([t[IDS[g][i]] for i in range(3)]) for t, g in zip(src, GROUPS, strict=True)]
    other = arena()
    other.gather(EngineKV(GEOMETRY, [t.contiguous() for t in flat]), [0, 1, 2], [4, 0, 2])
    assert torch.equal(other.bytes, blocks.bytes)


@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
def test_a_load_skips_a_groups_pairs_without_a_block(staged):
    src = engine(seed=2)
    blocks = arena()
    blocks.gather(EngineKV(GEOMETRY, src, GROUPS), IDS, [0, 1, 2])
    dst = engine(seed=None)
    kv = EngineKV(GEOMETRY, dst, GROUPS)
    loaded = [[4, 5, 6], [-1, -1, 8]]  # the sliding group holds the last position only
    if staged:
        done = list(StagedCopies(blocks, kv, capacity=2).scatter_layers([0, 1, 2], loaded))
    else:
        done = list(blocks.scatter_layers(kv, [0, 1, 2], loaded))
    assert done[-1] == GEOMETRY.num_layers
    for t_src, t_dst, g in zip(src, dst, GROUPS, strict=True):
        for i, b in enumerate(loaded[g]):
            if b >= 0:
                assert torch.equal(t_dst[b], t_src[IDS[g][i]])
        untouched = [b for b in range(BLOCKS) if b not in loaded[g]]
        assert not t_dst[untouched].any(), "a block no pair named was written"


def test_block_ids_must_come_one_row_per_group():
    kv, blocks = EngineKV(GEOMETRY, engine(seed=None), GROUPS), arena()
    with pytest.raises(ValueError, match="2 row"):
        blocks.gather(kv, [1, 2], [0, 1])
    with pytest.raises(ValueError, match="engine block ids"):
        blocks.scatter(kv, [0], [[BLOCKS], [0]])


def test_groups_must_number_the_layers():
    with pytest.raises(GeometryMismatch, match="number the layers"):
        EngineKV(GEOMETRY, engine(seed=None), [0, 2, 0, 2])


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC"])
@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
def test_a_stage_of_fewer_layers_fills_the_first_and_zeroes_the_rest(staged, layout):
    g = ModelGeometry(3, 2, 8, 4, "float32", layout)
    one = ModelGeometry(1, 2, 8, 4, "float32", layout)
    blocks = ArenaBlocks(g, np.full(SLOTS * g.slot_bytes, 0xAB, dtype=np.uint8), SLOTS)
    src = [new_caches(one, BLOCKS)[0] for _ in range(2)]  # this stage: 2 of 3 layers
    for i, t in enumerate(src):
        t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(i)))
    kv = EngineKV(g, src, stage=True)
    copies = StagedCopies(blocks, kv, capacity=2) if staged else None
    if copies is not None:
        copies.gather([3, 1, 4], [2, 0, 5])
        copies.scatter([3], [9])  # a load between: its slot's bytes (0xAB) pass through staging
        copies.gather([6], [1])
    else:
        blocks.gather(kv, [3, 1, 4], [2, 0, 5])
        blocks.gather(kv, [6], [1])
    # what the slots must hold: the whole model's block with a third layer of zeros
    whole = ArenaBlocks(g, np.zeros(SLOTS * g.slot_bytes, dtype=np.uint8), SLOTS)
    whole.gather(EngineKV(g, [*src, new_caches(one, BLOCKS)[0]]), [3, 1, 4, 6], [2, 0, 5, 1])
    for slot in (2, 0, 5, 1):
        at = slice(slot * g.slot_bytes, slot * g.slot_bytes + g.block_bytes)
        assert torch.equal(blocks.bytes[at], whole.bytes[at]), f"slot {slot}"
    dst = [new_caches(one, BLOCKS)[0] for _ in range(2)]
    blocks.scatter(EngineKV(g, dst, stage=True), [2, 0], [7, 8])
    for d, s in zip(dst, src, strict=True):
        assert torch.equal(d[7], s[3]) and torch.equal(d[8], s[1])


def test_an_engine_of_more_layers_than_the_geometry_is_refused():
    with pytest.raises(GeometryMismatch, match="5 KV layers, geometry says 4"):
        EngineKV(GEOMETRY, engine(seed=None) + engine(seed=None)[:1])
