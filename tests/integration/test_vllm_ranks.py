"""A block split across workers: each pipeline stage holds its layers of
every block, and each decode-context-parallel rank every n-th token of it.
Every worker keys its share with its rank (stage * TP size + TP rank,
kvbm/block_key.py). vLLM's real `Scheduler` and one worker-side connector
per stage or rank against a real `kvbm node` (tests/harness/vllm_steps.py):
every worker saves and loads its own share, bit-exact, and a prefix is
promised only as far as every share is held."""

from __future__ import annotations

import functools

import pytest

from kvbm.connector.attach import node_stats
from tests.harness.vllm_runs import prompt
from tests.harness.vllm_steps import BLOCK, expected_values

STAGES = 2  # the tests' model has 2 layers: one a stage (3 in the unequal stages' test)


@pytest.fixture
def staged(engines):
    """engines(...) of two pipeline stages."""
    return functools.partial(engines, stages=STAGES)


@pytest.mark.support("pipeline-parallel", "hits", "vllm-objects")
def test_every_stage_saves_and_loads_its_own_share(staged, node):
    """Engine 1 computes p: each stage saves its layer of p's three blocks
    under its rank (six blocks in the node). Engine 2 counts the three
    computed, each stage loads its share from its rank's slots, and every
    layer holds what was computed."""
    p = prompt(1)
    first = staged()
    assert first.connector.setup.geometry.num_layers == 1  # a stage's layers
    first.add("computed", p)
    first.run()
    assert node_stats(node.socket)["tiers"]["host"]["blocks"] == 3 * STAGES
    engine = staged()
    assert engine.admit("again", p) == 3 * BLOCK
    [load] = engine.metas[0].loads
    ids = engine.block_ids("again")
    assert load.block_ids == [ids[:3]] and len(load.slots) == STAGES
    assert engine.values(ids[:3]) == expected_values(p)[:3]  # both layers, both stages
    engine.run()


@pytest.mark.support("pipeline-parallel", "hits", "vllm-objects")
def test_a_prefix_one_stage_lacks_is_not_promised(staged, node):
    """The node holds p's three blocks for stage 0 and its first block alone
    for stage 1: vLLM counts one block computed, not three."""
    p = prompt(2)
    engine = staged()
    engine.hold(node.socket, p, list(range(3)), rank=0)
    engine.hold(node.socket, p, list(range(1)), rank=1)
    assert engine.admit("partial", p) == BLOCK
    ids = engine.block_ids("partial")
    assert engine.values(ids[:1]) == expected_values(p)[:1]
    engine.run()


@pytest.mark.support("pipeline-parallel", "hits", "vllm-objects")
def test_stages_of_unequal_layer_counts_each_save_and_load_their_share(node, tmp_path):
    """Three layers over two stages (vLLM's partition: two and one): one
    geometry of the larger stage's two layers serves both, the one-layer
    stage filling the first slot layer. Engine 2 counts p's three blocks
    computed, and every layer of both stages holds what was computed."""
    from vllm.config import ModelConfig

    from tests.harness.tiny_llama import build
    from tests.harness.vllm_steps import SteppedEngine

    path = build(str(tmp_path / "tiny-llama"))
    model = ModelConfig(
        model=path,
        dtype="float32",
        seed=0,
        max_model_len=1024,
        hf_overrides={"num_hidden_layers": 3},
    )
    p = prompt(3)
    made = []
    try:
        first = SteppedEngine(model, node.socket, stages=STAGES)
        made.append(first)
        assert [len(names) for names in first.staged] == [2, 1]
        assert first.connector.setup.geometry.num_layers == 2  # the larger stage's
        first.add("computed", p)
        first.run()
        assert node_stats(node.socket)["tiers"]["host"]["blocks"] == 3 * STAGES
        engine = SteppedEngine(model, node.socket, stages=STAGES)
        made.append(engine)
        assert engine.admit("again", p) == 3 * BLOCK
        ids = engine.block_ids("again")
        assert engine.values(ids[:3]) == expected_values(p)[:3]  # all three layers
        engine.run()
    finally:
        for engine in made:
            engine.close()


@pytest.fixture(scope="module")
def one_kv_head(tmp_path_factory):
    """The tests' Llama with one KV head: vLLM runs decode context
    parallelism only where tensor parallelism splits the KV heads no more
    (two workers, two DCP ranks sharing the head)."""
    from vllm.config import ModelConfig

    from tests.harness.tiny_llama import build

    path = build(str(tmp_path_factory.mktemp("tiny-llama")))
    return ModelConfig(
        model=path,
        dtype="float32",
        seed=0,
        max_model_len=1024,
        hf_overrides={"num_key_value_heads": 1},
    )


@pytest.mark.support("context-parallel", "hits", "vllm-objects")
@pytest.mark.support("context-parallel", "bytes", "vllm-objects")
def test_decode_context_parallel_ranks_each_save_and_load_their_share(node, one_kv_head):
    """Two DCP ranks: vLLM's block spans 64 tokens, and each rank holds
    every other one of them in a 32-token block of its own cache. Engine 1
    computes p: each rank saves its share of p's three blocks under its
    rank. Engine 2 counts the three computed, and each rank's blocks hold
    its own share (which differs from the other rank's)."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from tests.harness.vllm_steps import HEAD_SIZE, SteppedEngine

    spec = FullAttentionSpec(
        block_size=BLOCK, num_kv_heads=1, head_size=HEAD_SIZE, dtype=torch.float32
    )
    p = prompt(4, 6 * BLOCK + 4)  # three blocks of 64 tokens
    made = []
    try:
        first = SteppedEngine(one_kv_head, node.socket, spec=spec, dcp=2)
        made.append(first)
        setup = first.connector.setup
        assert (setup.block_size, setup.geometry.block_size, setup.ranks) == (2 * BLOCK, BLOCK, 2)
        first.add("computed", p)
        first.run()
        assert node_stats(node.socket)["tiers"]["host"]["blocks"] == 3 * 2
        engine = SteppedEngine(one_kv_head, node.socket, spec=spec, dcp=2)
        made.append(engine)
        assert engine.admit("again", p) == 3 * 2 * BLOCK
        ids = engine.block_ids("again")
        shares = [expected_values(p, dcp=2, rank=r)[:3] for r in range(2)]
        assert shares[0] != shares[1]  # a rank loading the other's share would show
        for r in range(2):
            assert engine.values(ids[:3], rank=r) == shares[r]
        engine.run()
    finally:
        for engine in made:
            engine.close()
