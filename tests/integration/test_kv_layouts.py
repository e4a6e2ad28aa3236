"""Every KV cache layout vLLM can hand a connector, made by vLLM's own
`allocate_kv_cache` (CPU tensors shaped and strided exactly as on a GPU):
each round trip through the arena is bit-exact, directly and through a
staging buffer, and a block's bytes in the arena are its axes in the
layout's order, computed here independently of kvbm/connector/copy.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
    KVQuantMode,
    MLAAttentionSpec,
    compute_layout_strides,
)
from vllm.v1.kv_cache_layout import KVCacheLayout
from vllm.v1.worker.utils import allocate_kv_cache

from kvbm.connector.copy import ArenaBlocks, StagedCopies
from kvbm.connector.engine_kv import EngineKV
from kvbm.errors import GeometryMismatch
from kvbm.layout import KV_LAYOUTS, ModelGeometry

NUM_BLOCKS = 10
NUM_SLOTS = 12
BLOCK_IDS = [3, 1, 7, 2, 8]
SLOTS = [5, 6, 0, 9, 10]  # runs 0 | 5-6 | 9-10, not in block order
# vLLM allocates fp8 caches as uint8 ("fp8" -> torch.uint8 in its dtype table)
DTYPES = {
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float8_e4m3fn": torch.uint8,
    "float8_e5m2": torch.uint8,
    "packed-int8_per_token_head": torch.int8,
}


def vllm_caches(
    g: ModelGeometry, kernel_block: int | None = None, seed: int | None = 0
) -> list[torch.Tensor]:
    """Per-layer views as vLLM's GPU model runner registers them with a
    connector (`allocate_kv_cache`), filled with random bytes (zeros when
    `seed` is None)."""
    mla = g.head_dim_v == 0 and not g.dtype.startswith("packed-")
    spec_of = MLAAttentionSpec if mla else FullAttentionSpec
    if g.dtype.startswith("packed-"):  # int8 K and V of a head, then their fp32 scales
        spec = TritonAttentionBackend.customize_spec(
            FullAttentionSpec(
                block_size=g.block_size,
                num_kv_heads=g.num_kv_heads,
                head_size=(g.head_dim - 8) // 2,
                dtype=DTYPES[g.dtype],
                kv_quant_mode=KVQuantMode.INT8_PER_TOKEN_HEAD,
            )
        )
        assert spec.state_content_bytes == g.head_dim
    else:
        spec = spec_of(
            block_size=g.block_size,
            num_kv_heads=g.num_kv_heads,
            head_size=g.head_dim,
            dtype=DTYPES[g.dtype],
        )
    layout = KVCacheLayout[g.kv_layout]
    names = [f"model.layers.{i}.self_attn.attn" for i in range(g.num_layers)]
    # kv_cache_utils' placement: B-outer layouts pack each block's layers
    packed = g.num_layers * spec.page_size_bytes if layout.is_block_outermost else None
    layer_stride, block_stride, *_ = compute_layout_strides(
        spec, NUM_BLOCKS, g.num_layers, layout, fixed_strides=(None, packed, None, None, None)
    )
    size = NUM_BLOCKS * g.num_layers * spec.page_size_bytes
    tensor = KVCacheTensor(
        size=size, layers=names, layer_stride=layer_stride, block_stride=block_stride
    )
    config = KVCacheConfig(
        num_blocks=NUM_BLOCKS,
        kv_cache_tensors=[tensor],
        kv_cache_groups=[KVCacheGroupSpec(names, spec)],
    )
    views = allocate_kv_cache(config, torch.device("cpu"), layout, [kernel_block or g.block_size])
    layers = [views[name] for name in names]
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        raw = layers[0].untyped_storage()
        flat = torch.empty(0, dtype=torch.uint8).set_(raw)
        flat.copy_(torch.randint(0, 256, (flat.numel(),), dtype=torch.uint8, generator=gen))
    return layers


def logical_block(layers: list[torch.Tensor], block: int, n: int) -> torch.Tensor:
    """Block `block` as [L, H, N, C] (kernel blocks joined), from vLLM's views."""
    out = []
    for t in layers:
        r = t.shape[0] // NUM_BLOCKS
        kernel = t[block * r : (block + 1) * r]  # [R, H, Nk, C]
        out.append(kernel.permute(1, 0, 2, 3).reshape(t.shape[1], n, t.shape[3]))
    return torch.stack(out)


def canonical_bytes(g: ModelGeometry, layers: list[torch.Tensor], block: int) -> bytes:
    """The arena's bytes of a block: its [L, H, N, C] axes in the layout's order."""
    block_axes = logical_block(layers, block, g.block_size)
    order = [("LHNC").index(a) for a in g.block_order]
    return block_axes.permute(*order).contiguous().view(torch.uint8).numpy().tobytes()


def geometries() -> list[tuple[str, ModelGeometry, int | None]]:
    cases = []
    for layout in KV_LAYOUTS:
        cases.append((f"{layout}-bf16", ModelGeometry(3, 2, 8, 16, "bfloat16", layout), None))
        cases.append((f"{layout}-mla", ModelGeometry(2, 1, 24, 16, "bfloat16", layout, 0), None))
        cases.append((f"{layout}-fp8", ModelGeometry(3, 2, 8, 16, "float8_e4m3fn", layout), None))
        packed = ModelGeometry(2, 2, 24, 16, "packed-int8_per_token_head", layout, 0)
        cases.append((f"{layout}-int8-per-token-head", packed, None))
        if layout[0] == "L" and layout != "LHBNC":  # vLLM splits dense pages only
            cases.append((f"{layout}-split", ModelGeometry(2, 2, 8, 16, "float32", layout), 4))
    return cases


CASES = geometries()


@pytest.mark.support("full-attention", "bytes", "vllm-objects")
@pytest.mark.support("mla", "bytes", "vllm-objects")
@pytest.mark.support("fp8-kv", "bytes", "vllm-objects")
@pytest.mark.support("quantized-kv", "bytes", "vllm-objects")
@pytest.mark.parametrize(("g", "kernel"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
def test_round_trip_is_bit_exact_and_canonical(g, kernel, staged):
    src = vllm_caches(g, kernel, seed=1)
    dst = vllm_caches(g, kernel, seed=None)
    arena = np.zeros(NUM_SLOTS * g.slot_bytes, dtype=np.uint8)
    blocks = ArenaBlocks(g, arena, NUM_SLOTS)
    kv_src, kv_dst = EngineKV(g, src), EngineKV(g, dst)
    assert len(kv_src.parts) == 1  # vLLM's layers are one buffer: one op for all of them
    assert kv_src.kernel_split == (g.block_size // kernel if kernel else 1)
    if staged:
        StagedCopies(blocks, kv_src, capacity=8).gather(BLOCK_IDS, SLOTS)
    else:
        blocks.gather(kv_src, BLOCK_IDS, SLOTS)
    for slot in range(NUM_SLOTS):
        data = arena[slot * g.slot_bytes : (slot + 1) * g.slot_bytes]
        if slot in SLOTS:
            block = BLOCK_IDS[SLOTS.index(slot)]
            assert data[: g.block_bytes].tobytes() == canonical_bytes(g, src, block)
            assert not data[g.block_bytes :].any(), "a slot's padding was written"
        else:
            assert not data.any(), f"slot {slot} was not in the batch but was written"
    back = [4, 0, 9, 5, 6]
    if staged:
        StagedCopies(blocks, kv_dst, capacity=8).scatter(SLOTS, back)
    else:
        blocks.scatter(kv_dst, SLOTS, back)
    for block in range(NUM_BLOCKS):
        got = logical_block(dst, block, g.block_size)
        if block in back:
            want = logical_block(src, BLOCK_IDS[back.index(block)], g.block_size)
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        else:
            assert not got.view(torch.uint8).any(), f"block {block} was written"


def test_layouts_with_the_same_block_order_share_blocks():
    """A layer-by-layer cache (LBHNC) and one with each block's layers
    together (BLHNC) hold a block in the same bytes: one fingerprint, and
    a block stored by one loads into the other."""
    a = ModelGeometry(3, 2, 8, 16, "bfloat16", "LBHNC")
    b = ModelGeometry(3, 2, 8, 16, "bfloat16", "BLHNC")
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != ModelGeometry(3, 2, 8, 16, "bfloat16", "LBNHC").fingerprint
    src, dst = vllm_caches(a, seed=2), vllm_caches(b, seed=None)
    arena = np.zeros(NUM_SLOTS * a.slot_bytes, dtype=np.uint8)
    ArenaBlocks(a, arena, NUM_SLOTS).gather(EngineKV(a, src), [6], [2])
    ArenaBlocks(b, arena, NUM_SLOTS).scatter(EngineKV(b, dst), [2], [1])
    got, want = logical_block(dst, 1, 16), logical_block(src, 6, 16)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_a_split_block_is_stored_as_the_same_block_whole():
    """vLLM may split a block into kernel blocks of fewer tokens: the arena
    holds the same bytes as for the block whole (the scheduler, which
    cannot know the split, computes the same keys)."""
    g = ModelGeometry(2, 2, 8, 16, "float32", "LBHNC")
    split, whole = vllm_caches(g, kernel_block=4, seed=3), vllm_caches(g, seed=None)
    for layer_split, layer_whole in zip(split, whole, strict=True):  # same KV, whole blocks
        r = layer_split.shape[0] // NUM_BLOCKS
        joined = layer_split.unflatten(0, (NUM_BLOCKS, r)).permute(0, 2, 1, 3, 4)
        layer_whole.copy_(joined.reshape(layer_whole.shape))
    arena = np.zeros(2 * NUM_SLOTS * g.slot_bytes, dtype=np.uint8)
    blocks = ArenaBlocks(g, arena, 2 * NUM_SLOTS)
    blocks.gather(EngineKV(g, split), BLOCK_IDS, SLOTS)
    blocks.gather(EngineKV(g, whole), BLOCK_IDS, [s + NUM_SLOTS for s in SLOTS])
    half = NUM_SLOTS * g.slot_bytes
    assert arena[:half].any() and np.array_equal(arena[:half], arena[half:])


@pytest.mark.parametrize(("said", "made"), [("LBHNC", "LBNHC"), ("BLNHC", "BHLNC")])
def test_a_cache_in_another_layout_than_the_geometry_says_is_refused(said, made):
    g = ModelGeometry(2, 2, 8, 16, "bfloat16", made)
    layers = vllm_caches(g, seed=None)
    with pytest.raises(GeometryMismatch, match="laid out"):
        EngineKV(ModelGeometry(2, 2, 8, 16, "bfloat16", said), layers)


def test_layers_inside_heads_as_separate_tensors_are_refused():
    """BHLNC puts a block's layers inside each head: per-layer tensors
    cannot be that layout (BLHNC's can: its blocks' bytes are LHNC)."""
    g = ModelGeometry(2, 2, 8, 16, "bfloat16", "BHLNC")
    layers = [t.clone() for t in vllm_caches(g, seed=None)]
    with pytest.raises(GeometryMismatch, match="separate tensors"):
        EngineKV(g, layers)


@pytest.mark.parametrize("layout", KV_LAYOUTS)
@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
def test_a_load_hands_over_layer_by_layer(layout, staged):
    """`scatter_layers` yields 1, 2, ... L, with the layers it counted in
    place each time (all at once for BHLNC, whose blocks keep layers inside
    heads); directly, no layer before its turn. A staging buffer of 2 takes
    the batch of 5 in chunks (the first chunks whole, then the last layer
    by layer)."""
    g = ModelGeometry(3, 2, 8, 16, "bfloat16", layout)
    src, dst = vllm_caches(g, seed=4), vllm_caches(g, seed=None)
    arena = np.zeros(NUM_SLOTS * g.slot_bytes, dtype=np.uint8)
    blocks = ArenaBlocks(g, arena, NUM_SLOTS)
    blocks.gather(EngineKV(g, src), BLOCK_IDS, SLOTS)
    kv = EngineKV(g, dst)
    steps = (
        StagedCopies(blocks, kv, capacity=2).scatter_layers(SLOTS, BLOCK_IDS)
        if staged
        else blocks.scatter_layers(kv, SLOTS, BLOCK_IDS)
    )
    counts = []
    for done in steps:
        counts.append(done)
        for layer in range(g.num_layers):
            for block in BLOCK_IDS:
                got = dst[layer][block].reshape(-1).view(torch.uint8)
                want = src[layer][block].reshape(-1).view(torch.uint8)
                if layer < done or not staged:
                    assert torch.equal(got, want) == (layer < done), (done, layer, block)
    assert counts == ([3] if layout == "BHLNC" else [1, 2, 3])
