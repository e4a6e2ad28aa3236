"""Models of several KV cache groups (gpt-oss's full and sliding-window
layers, a Mamba or linear-attention hybrid's state) as vLLM's hybrid KV
cache manager makes them (vLLM 0.32 keeps it on CPU too). kvbm declares
`SupportsHMA`, so vLLM keeps that manager with kvbm configured (without it,
a Mamba hybrid does not start); the connector turns itself off for such a
model, tells its node, and vLLM's real scheduler serves requests without
it."""

from __future__ import annotations

import os

import pytest
import torch
from vllm.config import ModelConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec, SlidingWindowSpec

from kvbm.config import KvbmConfig
from kvbm.connector.vllm import kv_transfer_config
from kvbm.status import node as node_status
from tests.harness.vllm_steps import BLOCK, HEAD_SIZE, KV_HEADS, SteppedEngine

SHAPE = {"block_size": BLOCK, "num_kv_heads": KV_HEADS, "head_size": HEAD_SIZE}
GPT_OSS_LIKE = [
    FullAttentionSpec(**SHAPE, dtype=torch.float32),
    SlidingWindowSpec(**SHAPE, dtype=torch.float32, sliding_window=64),
]
MAMBA_HYBRID = [
    FullAttentionSpec(**SHAPE, dtype=torch.float32),
    MambaSpec(block_size=BLOCK, shapes=((4, 64), (2, 16, 16)), dtypes=(torch.float32,) * 2),
]


def test_vllm_keeps_its_hybrid_manager_with_kvbm_configured():
    """vLLM's own rule (config/vllm.py): the hybrid manager stays on only for
    a connector that supports it; off, a Mamba hybrid fails to start."""
    assert KVConnectorFactory.supports_hma_config(kv_transfer_config({"node": "/x"}))


def test_vllms_cpu_build_keeps_the_hybrid_manager_too(tmp_path):
    """vLLM 0.32's CPU platform supports the hybrid manager, so a model of
    full and sliding-window layers (gpt-oss, Gemma 2 or 3) is several
    groups there too with kvbm configured, and kvbm is off for it, unless
    the engine is started with --disable-hybrid-kv-cache-manager."""
    from vllm.config import CacheConfig, DeviceConfig, VllmConfig

    from kvbm.gpu_models import build_gpt_oss_like

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = build_gpt_oss_like(str(tmp_path / "gpt-oss-like"))
    model = ModelConfig(model=path, dtype="float32", max_model_len=1024)
    config = VllmConfig(
        model_config=model,
        cache_config=CacheConfig(block_size=BLOCK),
        kv_transfer_config=kv_transfer_config({"node": "/x"}),
        device_config=DeviceConfig("cpu"),
    )
    assert model.get_sliding_window() is not None
    assert config.scheduler_config.disable_hybrid_kv_cache_manager is False


@pytest.mark.parametrize(
    "groups",
    [
        pytest.param(
            GPT_OSS_LIKE,
            id="gpt-oss-like",
            marks=pytest.mark.support(
                "full-and-sliding", "hits", "vllm-objects", refused="several-groups"
            ),
        ),
        pytest.param(
            MAMBA_HYBRID,
            id="mamba",
            marks=pytest.mark.support(
                "mamba-hybrid", "hits", "vllm-objects", refused="mamba-state"
            ),
        ),
    ],
)
def test_a_model_of_several_groups_runs_without_kvbm_and_the_node_hears_why(model, daemons, groups):
    node = daemons("solo", "127.0.0.2", "--host-cache-mb", "2")
    engine = SteppedEngine(model, node.socket, spec=groups)
    try:
        assert engine.connector.setup.off
        for i in range(3):
            engine.add(f"r{i}", [4 + (i * 131 + j * 37) % 500 for j in range(3 * BLOCK + 4)])
        engine.run()
        assert all(not m.loads and not m.saves for m in engine.metas)
        cfg = KvbmConfig(socket=node.socket)
        [told] = node_status(cfg)["engine_refusals"]
        assert told["kind"] == "kv_cache" and "2 group(s)" in told["reason"]
    finally:
        engine.close()
