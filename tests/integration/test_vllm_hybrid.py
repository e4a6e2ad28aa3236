"""Models of several KV cache groups (gpt-oss's full and sliding-window
layers, a Mamba or linear-attention hybrid's state) as vLLM's hybrid KV
cache manager makes them (vLLM 0.32 keeps it on CPU too), driven step by
step by vLLM's real `Scheduler` against a real `kvbm node`
(tests/harness/vllm_steps.py). kvbm declares `SupportsHMA`, so vLLM keeps
that manager with kvbm configured (without it, a Mamba hybrid does not
start). Groups of attention are stored, a slot holding every group's
layers of a position; a Mamba state group turns the connector off, the
node hears why, and vLLM serves requests without it."""

from __future__ import annotations

import os

import pytest
import torch
from vllm.config import ModelConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec, SlidingWindowSpec

from kvbm.config import KvbmConfig
from kvbm.connector.attach import NodeAttachment
from kvbm.connector.attention_window import NULL_BLOCK
from kvbm.connector.vllm import kv_transfer_config
from kvbm.status import node as node_status
from tests.harness import vllm_runs as runs
from tests.harness.vllm_steps import BLOCK, HEAD_SIZE, KV_HEADS, SteppedEngine, expected_values

WINDOW = 64  # tokens: 6 blocks computed, the next token sees blocks 4 and 5
REACH = WINDOW // BLOCK  # the stand-in model's blocks a sliding-window block attends to
SHAPE = {"block_size": BLOCK, "num_kv_heads": KV_HEADS, "head_size": HEAD_SIZE}
SLIDING = SlidingWindowSpec(**SHAPE, dtype=torch.float32, sliding_window=WINDOW)
GPT_OSS_LIKE = [FullAttentionSpec(**SHAPE, dtype=torch.float32), SLIDING]
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


def prompt(seed: int, n: int = 6 * BLOCK + 4) -> list[int]:
    return runs.prompt(seed, n)


def loads_of(engine: SteppedEngine, req_id: str) -> list:
    return [load for m in engine.metas for load in m.loads if load.req_id == req_id]


def gpt_oss_like(engines, **kwargs) -> SteppedEngine:
    return engines(spec=GPT_OSS_LIKE, reach=REACH, **kwargs)


@pytest.mark.support("full-and-sliding", "hits", "vllm-objects")
@pytest.mark.support("full-and-sliding", "bytes", "vllm-objects")
@pytest.mark.parametrize("copies", ["sync", "async"])
def test_a_full_and_sliding_model_stores_both_groups_and_loads_what_each_needs(
    engines, node, copies
):
    """gpt-oss's shape: a full-attention group and a sliding-window group,
    each numbering its blocks apart. A slot holds both groups' layers of a
    position; the null block is never saved. A later engine counts all six
    blocks computed: the full group loads all six, the sliding group the
    two its next token sees (vLLM gave it the null block for 0..3), and
    each group's blocks hold what that group computes."""
    p = prompt(1)
    first = gpt_oss_like(engines)
    first.add("computed", p)
    first.run()
    saves = [s for m in first.metas for s in m.saves]
    assert sum(len(s.seq_hashes) for s in saves) == 6
    assert all(len(s.block_ids) == 2 for s in saves)
    assert not any(NULL_BLOCK in ids for s in saves for ids in s.block_ids)

    engine = gpt_oss_like(engines, copies=copies)
    assert engine.admit("again", p) == 6 * BLOCK
    full, sliding = engine.block_ids("again", 0), engine.block_ids("again", 1)
    assert sliding[:4] == [NULL_BLOCK] * 4
    [load] = loads_of(engine, "again")
    assert load.waiting and load.block_ids == [full[:6], [-1] * 4 + sliding[4:6]]
    assert engine.values(full[:6], 0) == expected_values(p)[:6]
    assert engine.values(sliding[4:6], 1) == expected_values(p, REACH)[4:6]
    assert all(m.blocks_reused for m in engine.metas)
    engine.run()


@pytest.mark.support("full-and-sliding", "hits", "vllm-objects")
def test_a_prefix_the_full_group_cannot_serve_is_not_promised(engines, node):
    """The node holds p's blocks 4 and 5 alone: enough for a model of
    sliding-window layers only (its next token sees those two), not for
    one with a full-attention group, which needs every block. The control
    is the sliding-window engine over the same blocks."""
    p = prompt(2)
    gpt_oss_like(engines).hold(node.socket, p, [4, 5])
    assert engines(spec=SLIDING, reach=REACH).admit("sliding", p) == 6 * BLOCK
    hybrid = gpt_oss_like(engines)
    assert hybrid.admit("hybrid", p) == 0
    assert not loads_of(hybrid, "hybrid")
    hybrid.run()  # computed by vLLM itself, and saved whole
    saved = [s for m in hybrid.metas for s in m.saves if s.req_id == "hybrid"]
    assert sum(len(s.seq_hashes) for s in saved) == 6


@pytest.mark.support("full-and-sliding", "hits", "vllm-objects")
@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_a_hybrid_hit_whose_blocks_went_before_the_pin_fails_whole(
    engines, node, policy, monkeypatch
):
    """vLLM refuses failed blocks (`invalid_block_ids`) from a model of
    several groups, so a hit loads asynchronously and fails whole: evicted
    between the promise and the step's pin (the race forced here), vLLM
    recomputes p from its first token, every block of both groups holds
    what the model computes, and p's blocks are saved again."""
    p = prompt(9)
    gpt_oss_like(engines).hold(node.socket, p, list(range(6)))
    engine = gpt_oss_like(engines, policy=policy)
    probe = NodeAttachment(node.socket, engine.connector.setup.geometry)
    evict = engine.evict_after_promising(probe, "p", slice(0, 6))
    if policy == "recompute":  # with "fail" the hit is pinned before it is promised
        monkeypatch.setattr(engine.connector, "update_state_after_alloc", evict)
    try:
        if policy == "fail":
            engine.flood(probe)  # gone before the lookup: nothing is pinned, nor promised
        engine.add("p", p)
        engine.step()
        monkeypatch.undo()
        if policy == "recompute":
            assert engine.metas[0].failed_waits == ["p"] and not engine.metas[0].failed
            engine.step()  # received (failed): vLLM schedules p again, from its first token
        [again] = engine.outputs[-1].scheduled_new_reqs
        assert again.num_computed_tokens == 0
        engine.run()
        full = [s for m in engine.metas for s in m.saves if s.req_id == "p"]
        assert sum(len(s.seq_hashes) for s in full) == 6  # saved again: the node had lost them
    finally:
        probe.close()
    check = gpt_oss_like(engines)
    assert check.admit("check", p) == 6 * BLOCK
    assert check.values(check.block_ids("check", 0)[:6], 0) == expected_values(p)[:6]
    assert check.values(check.block_ids("check", 1)[4:6], 1) == expected_values(p, REACH)[4:6]


@pytest.mark.support("mamba-hybrid", "hits", "vllm-objects", refused="mamba-state")
def test_a_mamba_hybrid_runs_without_kvbm_and_the_node_hears_why(model, daemons):
    node = daemons("solo", "127.0.0.2", "--host-cache-mb", "2")
    engine = SteppedEngine(model, node.socket, spec=MAMBA_HYBRID)
    try:
        assert engine.connector.setup.off
        for i in range(3):
            engine.add(f"r{i}", [4 + (i * 131 + j * 37) % 500 for j in range(3 * BLOCK + 4)])
        engine.run()
        assert all(not m.loads and not m.saves for m in engine.metas)
        cfg = KvbmConfig(socket=node.socket)
        [told] = node_status(cfg)["engine_refusals"]
        assert told["kind"] == "kv_cache" and "MambaSpec" in told["reason"]
    finally:
        engine.close()


@pytest.mark.support("full-and-sliding", "hits", "vllm-objects")
def test_beside_vllms_prefix_cache_a_hybrid_loads_only_what_vllm_lacks(engines, node):
    """vLLM's prefix cache holds p's six blocks in both groups; the node
    holds `longer` (p and two blocks more). A request for `longer` counts
    vLLM's six and the connector's two: both groups load blocks 6 and 7
    alone, which hold what each group computes; the blocks vLLM's own hit
    brought are never saved again."""
    p = prompt(5)
    longer = p[: 6 * BLOCK] + prompt(6, 2 * BLOCK + 4)
    holder = gpt_oss_like(engines)
    holder.add("longer", longer)
    holder.run()
    engine = gpt_oss_like(engines, prefix_caching=True)
    engine.add("p", p)
    engine.run()
    assert engine.admit("again", longer) == 8 * BLOCK
    [load] = loads_of(engine, "again")
    full, sliding = engine.block_ids("again", 0), engine.block_ids("again", 1)
    assert load.block_ids == [full[6:8], sliding[6:8]]
    assert engine.values(full[:8], 0) == expected_values(longer)[:8]
    assert engine.values(sliding[6:8], 1) == expected_values(longer, REACH)[6:8]
    engine.run()
    # its eight full blocks were vLLM's or the node's: none is saved again
    assert not [s for m in engine.metas for s in m.saves if s.req_id == "again"]
