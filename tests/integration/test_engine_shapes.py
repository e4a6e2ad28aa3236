"""Which shapes of vLLM's KV cache the connector stores, and how it names
them (`geometry_of`, `groups_of`): vLLM's real specs, and a stand-in for
the parts of its config `geometry_of` reads."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from vllm.v1.kv_cache_interface import (
    ChunkedLocalAttentionSpec,
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVQuantMode,
    MambaSpec,
    MLAAttentionSpec,
    SlidingWindowSpec,
)

from kvbm.connector.attention_window import AttentionWindow
from kvbm.connector.vllm.engine_setup import KvGroup, geometry_of, groups_of
from kvbm.errors import KvbmError

SHAPE = {"block_size": 16, "num_kv_heads": 2, "head_size": 8}
LAYERS = ["model.layers.0.attn", "model.layers.1.attn"]


def config(
    cache_dtype: str = "auto", pp: int = 1, dcp: int = 1, layers: int = 2, pcp: int = 1
) -> SimpleNamespace:
    return SimpleNamespace(
        model_config=SimpleNamespace(
            dtype=torch.bfloat16, get_total_num_hidden_layers=lambda: layers
        ),
        parallel_config=SimpleNamespace(
            pipeline_parallel_size=pp,
            decode_context_parallel_size=dcp,
            prefill_context_parallel_size=pcp,
        ),
        cache_config=SimpleNamespace(cache_dtype=cache_dtype, kv_cache_layout=None, block_size=16),
    )


def groups(*specs) -> KVCacheConfig:
    return KVCacheConfig(16, [], [KVCacheGroupSpec(LAYERS, s) for s in specs])


@pytest.mark.support("sliding-window", "shape", "vllm-objects")
def test_a_sliding_window_group_is_stored_with_its_window():
    cache = groups(SlidingWindowSpec(**SHAPE, dtype=torch.bfloat16, sliding_window=64))
    g = geometry_of(config(), cache)
    assert (g.num_layers, g.num_kv_heads, g.head_dim, g.dtype) == (2, 2, 8, "bfloat16")
    assert groups_of(cache) == (KvGroup(tuple(LAYERS), AttentionWindow("sliding", 64, 16)),)
    full = groups(FullAttentionSpec(**SHAPE, dtype=torch.bfloat16))
    assert geometry_of(config(), full) == g  # the same bytes per block: the same fingerprint
    assert groups_of(full) == (KvGroup(tuple(LAYERS)),)


@pytest.mark.support("window-as-full", "shape", "vllm-objects")
def test_a_full_attention_group_with_a_sliding_window_keeps_every_block():
    """vLLM with its hybrid manager off (`--disable-hybrid-kv-cache-manager`)
    makes sliding-window layers full attention that keeps every block:
    nothing is skipped."""
    spec = FullAttentionSpec(**SHAPE, dtype=torch.bfloat16, sliding_window=64)
    assert groups_of(groups(spec))[0].window is None


@pytest.mark.support("chunked-local", "shape", "vllm-objects")
def test_a_chunked_local_group_is_stored_with_its_chunk():
    spec = ChunkedLocalAttentionSpec(**SHAPE, dtype=torch.bfloat16, attention_chunk_size=128)
    assert groups_of(groups(spec))[0].window == AttentionWindow("chunked", 128, 16)


@pytest.mark.support("fp8-kv", "shape", "vllm-objects")
@pytest.mark.parametrize(
    "cache_dtype,fmt",
    [("fp8", "float8_e4m3fn"), ("fp8_e4m3", "float8_e4m3fn"), ("fp8_e5m2", "float8_e5m2")],
)
def test_an_fp8_cache_is_named_by_its_format(cache_dtype, fmt):
    spec = FullAttentionSpec(**SHAPE, dtype=torch.uint8)  # vLLM's fp8 caches are uint8 tensors
    g = geometry_of(config(cache_dtype), groups(spec))
    assert g.dtype == fmt and g.layer_block_bytes == 2 * 16 * 16  # one byte an element
    other = geometry_of(config(), groups(FullAttentionSpec(**SHAPE, dtype=torch.bfloat16)))
    assert g.fingerprint != other.fingerprint


@pytest.mark.support("quantized-kv", "shape", "vllm-objects")
def test_a_per_token_head_packed_page_is_stored_as_its_bytes():
    """vLLM's per-token-head quantized caches (int8, fp8, int4) pack each
    head's K and V data with their fp32 scales, `state_content_bytes` a
    token: a block is those bytes, scales and all, named by the mode."""
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

    made = {}
    for mode, dtype in (
        (KVQuantMode.INT8_PER_TOKEN_HEAD, torch.int8),
        (KVQuantMode.FP8_PER_TOKEN_HEAD, torch.uint8),
        (KVQuantMode.INT4_PER_TOKEN_HEAD, torch.uint8),
    ):
        plain = FullAttentionSpec(**SHAPE, dtype=dtype, kv_quant_mode=mode)
        spec = TritonAttentionBackend.customize_spec(plain)
        g = geometry_of(config(mode.name.lower()), groups(spec))
        assert (g.head_dim, g.head_dim_v) == (spec.state_content_bytes, 0)
        assert g.dtype == f"packed-{mode.name.lower()}"
        assert g.layer_block_bytes == spec.page_size_bytes  # the page, scales included
        made[mode] = g
    assert len({g.fingerprint for g in made.values()}) == 3


@pytest.mark.support("pipeline-parallel", "shape", "vllm-objects")
def test_pipeline_stages_of_as_many_layers_are_stored():
    """Each stage's share is a block of the stage's layers; its rank tells
    the stage (kvbm/block_key.py)."""
    g = geometry_of(
        config(pp=2, layers=4), groups(FullAttentionSpec(**SHAPE, dtype=torch.bfloat16))
    )
    assert g.num_layers == 2  # the group's: one stage's layers


@pytest.mark.support("pipeline-parallel", "shape", "vllm-objects")
def test_stages_of_unequal_layer_counts_share_the_larger_stages_geometry():
    """Three layers over two stages: vLLM's partition is two and one; one
    geometry of two layers serves both (the smaller stage fills the first)."""
    layers = [f"model.layers.{i}.attn" for i in range(2)]
    cache = KVCacheConfig(
        16, [], [KVCacheGroupSpec(layers, FullAttentionSpec(**SHAPE, dtype=torch.bfloat16))]
    )
    assert geometry_of(config(pp=2, layers=3), cache).num_layers == 2


@pytest.mark.support("fp8-kv", "shape", "vllm-objects")
def test_e4m3_and_e5m2_never_share_blocks():
    spec = FullAttentionSpec(**SHAPE, dtype=torch.uint8)
    a = geometry_of(config("fp8_e4m3"), groups(spec))
    b = geometry_of(config("fp8_e5m2"), groups(spec))
    assert a.fingerprint != b.fingerprint


@pytest.mark.parametrize(
    "cfg,cache,says",
    [
        pytest.param(
            config("int8_per_token_head"),
            None,
            "int8_per_token_head",
            id="int8",
            marks=pytest.mark.support(
                "quantized-kv", "shape", "vllm-objects", refused="per-token-head"
            ),
        ),
        pytest.param(
            config(pcp=2),
            None,
            "prefill_context_parallel_size",
            id="pcp",
            marks=pytest.mark.support(
                "context-parallel", "shape", "vllm-objects", refused="context-parallel"
            ),
        ),
        pytest.param(
            config(),
            "heads",
            "one head shape",
            id="groups-of-two-head-shapes",
            marks=pytest.mark.support(
                "full-and-sliding", "shape", "vllm-objects", refused="head-shapes"
            ),
        ),
        pytest.param(
            config(),
            "mamba",
            "MambaSpec",
            id="mamba",
            marks=pytest.mark.support(
                "mamba-hybrid", "shape", "vllm-objects", refused="mamba-state"
            ),
        ),
        pytest.param(
            config("fp8"),
            "packed",
            "packed KV pages of nvfp4 mode",
            id="packed-nvfp4",
            marks=pytest.mark.support(
                "quantized-kv", "shape", "vllm-objects", refused="packed-pages"
            ),
        ),
    ],
)
def test_shapes_still_refused_say_why(cfg, cache, says):
    full = FullAttentionSpec(**SHAPE, dtype=torch.bfloat16)
    sliding = SlidingWindowSpec(**SHAPE, dtype=torch.bfloat16, sliding_window=64)
    made = {
        None: groups(full),
        "heads": KVCacheConfig(
            16,
            [],
            [
                KVCacheGroupSpec(LAYERS[:1], full),
                KVCacheGroupSpec(LAYERS[1:], dataclasses.replace(sliding, head_size=16)),
            ],
        ),
        "mamba": groups(MambaSpec(block_size=16, shapes=((4,),), dtypes=(torch.float32,))),
        "packed": groups(
            FullAttentionSpec(
                **SHAPE, dtype=torch.uint8, kv_quant_mode=KVQuantMode.NVFP4, state_content_bytes=40
            )
        ),
    }[cache]
    with pytest.raises(KvbmError, match=says):
        geometry_of(cfg, made)


@pytest.mark.support("full-and-sliding", "shape", "vllm-objects")
def test_groups_of_full_and_sliding_layers_are_the_same_models_geometry():
    """gpt-oss's layers with vLLM's hybrid manager on: a group of full
    attention and one of sliding-window attention. A slot holds both
    groups' layers, so the geometry (and the fingerprint) is that of the
    same model with the manager off, one group of every layer: engines
    with it on and off share blocks."""
    names = [f"model.layers.{i}.attn" for i in range(4)]
    full = FullAttentionSpec(**SHAPE, dtype=torch.bfloat16)
    sliding = SlidingWindowSpec(**SHAPE, dtype=torch.bfloat16, sliding_window=64)
    hybrid = KVCacheConfig(
        16, [], [KVCacheGroupSpec(names[0::2], full), KVCacheGroupSpec(names[1::2], sliding)]
    )
    off = KVCacheConfig(
        16, [], [KVCacheGroupSpec(names, dataclasses.replace(full, sliding_window=64))]
    )
    assert geometry_of(config(), hybrid) == geometry_of(config(), off)
    assert geometry_of(config(), hybrid).num_layers == 4
    assert groups_of(hybrid) == (
        KvGroup(tuple(names[0::2])),
        KvGroup(tuple(names[1::2]), AttentionWindow("sliding", 64, 16)),
    )


@pytest.mark.support("mamba-hybrid", "shape", "vllm-objects", refused="mamba-state")
def test_a_mamba_group_beside_attention_is_refused_by_name():
    full = FullAttentionSpec(**SHAPE, dtype=torch.bfloat16)
    mamba = MambaSpec(block_size=16, shapes=((4,),), dtypes=(torch.float32,))
    with pytest.raises(KvbmError, match=r"2 group\(s\) of \['FullAttentionSpec', 'MambaSpec'\]"):
        geometry_of(config(), groups(full, mamba))


def test_mla_on_cpu_is_refused_where_vllm_refuses_its_own_prefix_cache():
    """vLLM's CPU MLA backend computes over a cached prefix otherwise than
    over the whole prompt (tests/system/test_vllm_models.py measured it)."""
    spec = MLAAttentionSpec(block_size=16, num_kv_heads=1, head_size=576, dtype=torch.bfloat16)
    cfg = config()
    cfg.model_config.use_mla = True
    assert geometry_of(cfg, groups(spec)).head_dim == 576  # on a GPU: stored
    cfg.device_config = SimpleNamespace(device_type="cpu")
    with pytest.raises(KvbmError, match="CPU MLA backend"):
        geometry_of(cfg, groups(spec))
