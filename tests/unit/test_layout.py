"""kvbm.layout (geometry arithmetic, the layout fingerprint, slot spans) and
kvbm.connector.engine_kv (engine tensor checks), kvbm.connector.copy (the batched gather/scatter
copies between engine blocks (G1) and arena slots)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm.connector.copy import ArenaBlocks
from kvbm.connector.engine_kv import EngineKV, torch_dtype
from kvbm.errors import GeometryMismatch, KvbmError
from kvbm.layout import PAGE, VLLM_CPU_LAYOUT, ModelGeometry, align_up, slot_spans

NUM_BLOCKS = 12  # engine blocks per layer
NUM_SLOTS = 16  # arena slots

GEOMETRIES = {
    "float32": ModelGeometry(2, 2, 4, 4, "float32"),  # 256 B per layer block
    "float16": ModelGeometry(3, 1, 8, 2, "float16"),  # 64 B per layer block
    "bfloat16": ModelGeometry(2, 4, 2, 3, "bfloat16"),  # 96 B per layer block
    "4-byte-layers": ModelGeometry(3, 1, 1, 1, "float16"),  # 4 B: not a multiple of 8
    "two-page-slot": ModelGeometry(13, 1, 8, 5, "float32"),  # 4160 B block in an 8 KiB slot
}


# --- helpers --------------------------------------------------------------------------------


def random_layers(g: ModelGeometry, num_blocks: int, seed: int) -> list[torch.Tensor]:
    """Per-layer engine tensors full of random bytes (NaN bit patterns included)."""
    gen = torch.Generator().manual_seed(seed)
    nbytes = num_blocks * g.layer_block_bytes
    return [
        torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
        .view(torch_dtype(g))
        .view(num_blocks, *g.layer_shape)
        for _ in range(g.num_layers)
    ]


def zero_layers(g: ModelGeometry, num_blocks: int) -> list[torch.Tensor]:
    return [
        torch.zeros(num_blocks, *g.layer_shape, dtype=torch_dtype(g)) for _ in range(g.num_layers)
    ]


def new_arena(g: ModelGeometry, num_slots: int = NUM_SLOTS) -> torch.Tensor:
    return torch.zeros(num_slots * g.slot_bytes, dtype=torch.uint8)


def engine_block_bytes(layers: list[torch.Tensor], block_id: int) -> torch.Tensor:
    """A block's bytes as the arena must hold them: that block in each layer, in layer order."""
    return torch.cat([layer[block_id].reshape(-1).view(torch.uint8) for layer in layers])


def slot_of(arena: torch.Tensor, g: ModelGeometry, slot: int) -> torch.Tensor:
    return arena[slot * g.slot_bytes : (slot + 1) * g.slot_bytes]


def expect_gathered(arena, g, layers, block_ids, slots) -> None:
    """Slot slots[i] holds engine block block_ids[i] then zero padding; every other slot is
    still all zero."""
    written = dict(zip(slots, block_ids, strict=True))
    for slot in range(arena.numel() // g.slot_bytes):
        data = slot_of(arena, g, slot)
        if slot in written:
            assert torch.equal(data[: g.block_bytes], engine_block_bytes(layers, written[slot])), (
                f"slot {slot} does not hold engine block {written[slot]}"
            )
            assert not data[g.block_bytes :].any(), f"slot {slot} padding was written"
        else:
            assert not data.any(), f"slot {slot} was not in the batch but was written"


def expect_scattered(dst_layers, src_layers, dst_ids, src_ids) -> None:
    """Engine block dst_ids[i] equals source block src_ids[i]; other engine blocks are zero."""
    mapping = dict(zip(dst_ids, src_ids, strict=True))
    for block in range(dst_layers[0].shape[0]):
        got = engine_block_bytes(dst_layers, block)
        if block in mapping:
            want = engine_block_bytes(src_layers, mapping[block])
            assert torch.equal(got, want), f"engine block {block} != source {mapping[block]}"
        else:
            assert not got.any(), f"engine block {block} was not in the batch but was written"


def round_trip(g: ModelGeometry, block_ids: list[int], slots: list[int], back_ids: list[int]):
    """gather block_ids -> slots from random engine A; scatter slots -> back_ids into zeroed B."""
    src = random_layers(g, NUM_BLOCKS, seed=len(block_ids) + 7)
    arena = new_arena(g)
    blocks = ArenaBlocks(g, arena.numpy(), NUM_SLOTS)
    blocks.gather(EngineKV(g, src), block_ids, slots)
    expect_gathered(arena, g, src, block_ids, slots)
    dst = zero_layers(g, NUM_BLOCKS)
    blocks.scatter(EngineKV(g, dst), slots, back_ids)
    expect_scattered(dst, src, back_ids, block_ids)


# --- ModelGeometry --------------------------------------------------------------------------


def test_block_and_slot_bytes_of_a_real_model():
    # Llama-3.1-8B-like: 32 layers, 8 KV heads, head_dim 128, block 16, bf16
    g = ModelGeometry(32, 8, 128, 16, "bfloat16")
    assert g.layer_shape == (8, 16, 256)
    assert g.layer_block_bytes == 8 * 16 * 256 * 2 == 64 * 1024
    assert g.block_bytes == 32 * 64 * 1024 == 2 * 1024 * 1024
    assert g.slot_bytes == g.block_bytes  # already page aligned
    assert torch_dtype(g) is torch.bfloat16


def test_slot_bytes_round_up_to_a_page():
    # 4-byte layer blocks x 3 layers = 12 bytes -> one 4096-byte page
    tiny = GEOMETRIES["4-byte-layers"]
    assert (tiny.layer_block_bytes, tiny.block_bytes, tiny.slot_bytes) == (4, 12, PAGE)
    # 13 layers x 320 bytes = 4160 -> two pages
    two = GEOMETRIES["two-page-slot"]
    assert (two.layer_block_bytes, two.block_bytes, two.slot_bytes) == (320, 4160, 2 * PAGE)
    for g in GEOMETRIES.values():
        assert g.slot_bytes % PAGE == 0 and 0 <= g.slot_bytes - g.block_bytes < PAGE


def test_align_up():
    assert [align_up(n) for n in (0, 1, 4095, 4096, 4097)] == [0, 4096, 4096, 4096, 8192]
    assert align_up(5, 8) == 8 and align_up(16, 8) == 16


def test_fingerprint_is_pinned():
    """Nodes of every version must compute the same fingerprint for the same geometry, or
    they stop exchanging blocks: this literal must never change."""
    g = ModelGeometry(2, 2, 64, 32)
    assert g.dtype == "float32" and g.kv_layout == VLLM_CPU_LAYOUT
    assert g.fingerprint == 1319557143374472149


def test_fingerprint_is_stable_and_changes_with_every_field():
    base = ModelGeometry(2, 2, 64, 32)
    assert ModelGeometry(2, 2, 64, 32).fingerprint == base.fingerprint
    assert 0 <= base.fingerprint < 2**64
    variants = [
        dataclasses.replace(base, num_layers=3),
        dataclasses.replace(base, num_kv_heads=4),
        dataclasses.replace(base, head_dim=128),
        dataclasses.replace(base, block_size=16),
        dataclasses.replace(base, dtype="float16"),
        dataclasses.replace(base, dtype="bfloat16"),
    ]
    prints = {base.fingerprint} | {v.fingerprint for v in variants}
    assert len(prints) == len(variants) + 1
    # field values cannot slide into each other: (layers 12, heads 3) vs (layers 1, heads 23)
    assert ModelGeometry(12, 3, 8, 8).fingerprint != ModelGeometry(1, 23, 8, 8).fingerprint


@pytest.mark.parametrize("field", ["num_layers", "num_kv_heads", "head_dim", "block_size"])
@pytest.mark.parametrize("value", [0, -1])
def test_geometry_rejects_non_positive_sizes(field, value):
    kwargs = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 64, "block_size": 16, field: value}
    with pytest.raises(ValueError, match=field):
        ModelGeometry(**kwargs)


@pytest.mark.parametrize("dtype", ["float64", "int8", "fp8", "torch.float16", ""])
def test_geometry_rejects_unknown_dtype(dtype):
    with pytest.raises(ValueError, match="dtype"):
        ModelGeometry(2, 2, 64, 16, dtype)


def test_geometry_rejects_unknown_kv_layout():
    with pytest.raises(ValueError, match="kv_layout"):
        ModelGeometry(2, 2, 64, 16, "float16", kv_layout="vllm-gpu-v1")


# --- EngineKV -------------------------------------------------------------------------------


def expect_mismatch(g: ModelGeometry, layers: list[torch.Tensor], match: str) -> None:
    with pytest.raises(GeometryMismatch, match=match) as info:
        EngineKV(g, layers)
    assert isinstance(info.value, KvbmError) and isinstance(info.value, ValueError)


def test_engine_kv_accepts_matching_tensors():
    g = GEOMETRIES["float16"]
    kv = EngineKV(g, zero_layers(g, NUM_BLOCKS))
    assert kv.num_blocks == NUM_BLOCKS and kv.geometry is g


def test_engine_kv_rejects_wrong_layer_count():
    g = GEOMETRIES["float32"]  # 2 layers
    expect_mismatch(g, zero_layers(g, 4)[:1], "KV layers")
    expect_mismatch(g, zero_layers(g, 4) * 2, "KV layers")
    expect_mismatch(g, [], "KV layers")


def test_engine_kv_rejects_wrong_shape():
    g = GEOMETRIES["float32"]  # layer shape (2, 4, 8)
    h, b, d = g.layer_shape
    bad = [torch.zeros(4, h, b, d + 1), torch.zeros(4, h, b, d + 1)]
    expect_mismatch(g, bad, "shape")
    # heads and block positions swapped
    expect_mismatch(g, [torch.zeros(4, b, h, d), torch.zeros(4, b, h, d)], "shape")
    # missing block dimension
    expect_mismatch(g, [torch.zeros(h, b, d), torch.zeros(h, b, d)], "shape")
    # layers that disagree on the number of blocks
    expect_mismatch(g, [torch.zeros(4, h, b, d), torch.zeros(5, h, b, d)], "shape")


def test_engine_kv_rejects_wrong_dtype():
    g = GEOMETRIES["float32"]
    layers = [t.to(torch.float16) for t in zero_layers(g, 4)]
    expect_mismatch(g, layers, "dtype")
    g16 = GEOMETRIES["float16"]
    expect_mismatch(g16, [t.to(torch.bfloat16) for t in zero_layers(g16, 4)], "dtype")


def test_engine_kv_takes_padded_pages_and_refuses_another_order():
    g = GEOMETRIES["float32"]  # layer shape (2, 4, 8)
    h, b, d = g.layer_shape
    # every other block of a bigger tensor: a page padded to twice its bytes, as vLLM pads them
    src = random_layers(g, 8, seed=3)
    padded = [t[::2] for t in src]
    assert padded[0].shape == (4, h, b, d) and not padded[0].is_contiguous()
    arena = new_arena(g)
    ArenaBlocks(g, arena.numpy(), NUM_SLOTS).gather(EngineKV(g, padded), [1, 3], [0, 1])
    expect_gathered(arena, g, padded, [1, 3], [0, 1])
    # heads and positions transposed in memory: another layout than the geometry's
    transposed = [torch.zeros(4, b, h, d).transpose(1, 2) for _ in range(g.num_layers)]
    expect_mismatch(g, transposed, "laid out")


def test_engine_kv_check_ids():
    g = GEOMETRIES["float16"]
    kv = EngineKV(g, zero_layers(g, NUM_BLOCKS))
    kv.check_ids(np.array([0, NUM_BLOCKS - 1], dtype=np.int64))
    kv.check_ids(np.array([], dtype=np.int64))
    kv.check_ids(np.array([-1, 0], dtype=np.int64))  # -1: the group has no block there
    for bad in ([-2], [NUM_BLOCKS], [0, 3, NUM_BLOCKS + 100]):
        with pytest.raises(ValueError, match="engine block ids"):
            kv.check_ids(np.array(bad, dtype=np.int64))


# --- slot_spans ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("slots", "spans"),
    [
        ([], []),
        ([7], [(7, 1, 0)]),
        ([0, 1, 2, 3], [(0, 4, 0)]),
        ([0, 1, 3, 4, 5, 9], [(0, 2, 0), (3, 3, 2), (9, 1, 5)]),
        ([0, 3, 6, 9], [(0, 1, 0), (3, 1, 1), (6, 1, 2), (9, 1, 3)]),
        ([2, 2], [(2, 1, 0), (2, 1, 1)]),  # a repeat is not a span
    ],
)
def test_slot_spans(slots, spans):
    # (first slot, length, offset into the sorted slots) per span of consecutive slots
    got = slot_spans(np.array(slots, dtype=np.int64))
    assert got == spans
    assert all(type(x) is int for span in got for x in span)


# --- gather / scatter -----------------------------------------------------------------------

PATTERNS = {
    # name: (engine block ids, arena slots, engine ids to scatter back into)
    "contiguous": ([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]),
    "shuffled-slots": ([3, 4, 5, 6, 7], [9, 2, 14, 0, 5], [3, 4, 5, 6, 7]),
    "shuffled-ids": ([11, 0, 6, 3, 8], [4, 5, 6, 7, 8], [2, 9, 1, 10, 0]),
    "fragmented": ([1, 4, 5, 7, 10], [0, 3, 6, 9, 12], [1, 2, 3, 4, 5]),
    "both-shuffled": ([5, 2, 9, 0], [15, 1, 8, 3], [7, 11, 0, 4]),
    "single": ([11], [15], [0]),
    "empty": ([], [], []),
}


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_gather_scatter_round_trip(geometry, pattern):
    block_ids, slots, back_ids = PATTERNS[pattern]
    round_trip(GEOMETRIES[geometry], block_ids, slots, back_ids)


@settings(max_examples=40, deadline=None)
@given(
    geometry=st.sampled_from(sorted(GEOMETRIES)),
    ids=st.permutations(range(NUM_BLOCKS)),
    slots=st.permutations(range(NUM_SLOTS)),
    back=st.permutations(range(NUM_BLOCKS)),
    data=st.data(),
)
def test_gather_scatter_random_permutations(geometry, ids, slots, back, data):
    n = data.draw(st.integers(0, NUM_BLOCKS))
    round_trip(GEOMETRIES[geometry], ids[:n], slots[:n], back[:n])


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_scatter_reads_slot_bytes_layer_by_layer(geometry):
    # write blocks into slots by hand (no gather), then scatter: checks scatter on its own
    g = GEOMETRIES[geometry]
    src = random_layers(g, 3, seed=1)
    arena = new_arena(g, 4)
    for slot, block in [(3, 0), (1, 2)]:
        slot_of(arena, g, slot)[: g.block_bytes] = engine_block_bytes(src, block)
    dst = zero_layers(g, NUM_BLOCKS)
    # slots [3, 1] -> engine blocks [10, 4]
    ArenaBlocks(g, arena.numpy(), 4).scatter(EngineKV(g, dst), [3, 1], [10, 4])
    expect_scattered(dst, src, [10, 4], [0, 2])


def test_gather_overwrites_a_used_slot_in_full():
    g = GEOMETRIES["float32"]
    arena = new_arena(g)
    blocks = ArenaBlocks(g, arena.numpy(), NUM_SLOTS)
    first, second = random_layers(g, 2, seed=1), random_layers(g, 2, seed=2)
    blocks.gather(EngineKV(g, first), [0], [5])
    blocks.gather(EngineKV(g, second), [1], [5])
    expect_gathered(arena, g, second, [1], [5])


def test_ids_accept_numpy_and_torch():
    g = GEOMETRIES["float16"]
    src = random_layers(g, NUM_BLOCKS, seed=3)
    arena = new_arena(g)
    blocks = ArenaBlocks(g, arena.numpy(), NUM_SLOTS)
    blocks.gather(EngineKV(g, src), np.array([2, 7], dtype=np.int32), torch.tensor([4, 1]))
    expect_gathered(arena, g, src, [2, 7], [4, 1])


def test_arena_blocks_on_an_arena_with_extra_bytes():
    # an arena larger than num_slots * slot_bytes is fine; the tail is never written
    g = GEOMETRIES["bfloat16"]
    arena = torch.zeros(4 * g.slot_bytes + 100, dtype=torch.uint8)
    src = random_layers(g, NUM_BLOCKS, seed=4)
    ArenaBlocks(g, arena.numpy(), 4).gather(EngineKV(g, src), [1, 2, 3, 4], [3, 2, 1, 0])
    expect_gathered(arena[: 4 * g.slot_bytes], g, src, [1, 2, 3, 4], [3, 2, 1, 0])
    assert not arena[4 * g.slot_bytes :].any()


@pytest.mark.parametrize(
    ("block_ids", "slots"),
    [([0, 1], [0]), ([0], [0, 1]), ([], [0]), ([[0, 1]], [[0, 1]]), (0, 0)],
    ids=["more-ids", "more-slots", "empty-ids", "2d", "scalars"],
)
def test_mismatched_lengths_raise_value_error(block_ids, slots):
    g = GEOMETRIES["float32"]
    arena = new_arena(g)
    blocks = ArenaBlocks(g, arena.numpy(), NUM_SLOTS)
    kv = EngineKV(g, random_layers(g, NUM_BLOCKS, seed=5))
    with pytest.raises(ValueError):
        blocks.gather(kv, block_ids, slots)
    with pytest.raises(ValueError):
        blocks.scatter(kv, slots, block_ids)
    assert not arena.any()


def test_engine_block_ids_out_of_range_raise_value_error():
    g = GEOMETRIES["float32"]
    arena = new_arena(g)
    blocks = ArenaBlocks(g, arena.numpy(), NUM_SLOTS)
    kv = EngineKV(g, random_layers(g, NUM_BLOCKS, seed=5))
    for bad in ([NUM_BLOCKS], [-2], [0, NUM_BLOCKS + 3]):
        with pytest.raises(ValueError, match="engine block ids"):
            blocks.gather(kv, bad, list(range(len(bad))))
        with pytest.raises(ValueError, match="engine block ids"):
            blocks.scatter(kv, list(range(len(bad))), bad)
    assert not arena.any()


def test_engine_of_another_geometry_raises_geometry_mismatch():
    g, other = GEOMETRIES["float32"], GEOMETRIES["float16"]
    blocks = ArenaBlocks(g, new_arena(g).numpy(), NUM_SLOTS)
    kv = EngineKV(other, zero_layers(other, NUM_BLOCKS))
    with pytest.raises(GeometryMismatch):
        blocks.gather(kv, [0], [0])
    with pytest.raises(GeometryMismatch):
        blocks.scatter(kv, [0], [0])
    # same shapes, different block_size field -> still another geometry
    near = dataclasses.replace(g, block_size=g.block_size + 1)
    with pytest.raises(GeometryMismatch):
        blocks.gather(EngineKV(near, zero_layers(near, 2)), [0], [0])


def test_arena_blocks_rejects_a_small_or_non_byte_arena():
    g = GEOMETRIES["float32"]
    with pytest.raises(GeometryMismatch):
        ArenaBlocks(g, np.zeros(NUM_SLOTS * g.slot_bytes - 1, dtype=np.uint8), NUM_SLOTS)
    with pytest.raises(GeometryMismatch):
        ArenaBlocks(g, np.zeros(NUM_SLOTS * g.slot_bytes // 4, dtype=np.int32), NUM_SLOTS)


@pytest.mark.parametrize("slot", [-1, 2, 7])
def test_gather_and_scatter_reject_out_of_range_slots(slot):
    g = GEOMETRIES["float32"]
    arena = new_arena(g, 3)
    kv = EngineKV(g, random_layers(g, 2, seed=6))
    blocks = ArenaBlocks(g, arena.numpy(), 2)
    with pytest.raises(ValueError, match="slots must be in"):
        blocks.gather(kv, [0], [slot])
    with pytest.raises(ValueError, match="slots must be in"):
        blocks.scatter(kv, [slot], [0])
    # nothing was written anywhere, the third (out-of-range) slot included
    assert not arena.any()


def test_geometry_fields_must_be_integers():
    # 2.0 == 2, but its fingerprint text would differ: refuse it outright
    with pytest.raises(ValueError, match="positive integer"):
        ModelGeometry(2.0, 2, 64, 32)
    with pytest.raises(ValueError, match="positive integer"):
        ModelGeometry(2, True, 64, 32)
