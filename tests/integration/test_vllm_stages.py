"""Pipeline parallelism: each stage's workers hold their layers of every
block, and key their share with their rank (stage * TP size + TP rank,
kvbm/block_key.py). vLLM's real `Scheduler` and one worker-side connector
per stage against a real `kvbm node` (tests/harness/vllm_steps.py): every
stage saves and loads its own share, bit-exact, and a prefix is promised
only as far as every stage's share is held."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from vllm.config import ModelConfig

from kvbm.connector.attach import NodeAttachment, node_stats
from kvbm.connector.engine_kv import EngineKV, new_caches
from tests.harness.tiny_llama import build
from tests.harness.vllm_steps import BLOCK, SteppedEngine, expected_values

STAGES = 2  # the tests' model has 2 layers: one a stage


def prompt(seed: int, n: int = 3 * BLOCK + 4) -> list[int]:
    return [4 + (seed * 131 + i * 37) % 500 for i in range(n)]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> ModelConfig:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = build(str(tmp_path_factory.mktemp("tiny-llama")))
    return ModelConfig(model=path, dtype="float32", seed=0, max_model_len=1024)


@pytest.fixture
def node(daemons):
    return daemons("solo", "127.0.0.2", "--host-cache-mb", "8")


@pytest.fixture
def engines(model, node) -> Iterator:
    made: list[SteppedEngine] = []

    def make(**kwargs) -> SteppedEngine:
        made.append(SteppedEngine(model, node.socket, stages=STAGES, **kwargs))
        return made[-1]

    yield make
    for engine in made:
        engine.close()


def hold(engine: SteppedEngine, node, tokens: list[int], rank: int, blocks: int) -> None:
    """The node holds the first `blocks` blocks of `tokens` in rank `rank`'s
    share only (right values)."""
    setup = engine.connector.setup
    probe = NodeAttachment(node.socket, setup.geometry, rank=rank)
    try:
        seed = probe.hasher.seed(setup.model_identity)
        hashes = probe.hasher.sequence_hashes(tokens, BLOCK, seed)[:blocks]
        kv = new_caches(probe.geometry, blocks + 1)
        for i, value in enumerate(expected_values(tokens)[:blocks]):
            for layer in kv:
                layer[i + 1] = float(value)
        probe.store(EngineKV(probe.geometry, kv), probe.keys(hashes), list(range(1, blocks + 1)))
    finally:
        probe.close()


def first_step(engine: SteppedEngine, req_id: str, tokens: list[int]) -> int:
    engine.add(req_id, tokens)
    engine.step()
    [new] = [r for r in engine.outputs[-1].scheduled_new_reqs if r.req_id == req_id]
    return new.num_computed_tokens


@pytest.mark.support("pipeline-parallel", "hits", "vllm-objects")
def test_every_stage_saves_and_loads_its_own_share(engines, node):
    """Engine 1 computes p: each stage saves its layer of p's three blocks
    under its rank (six blocks in the node). Engine 2 counts the three
    computed, each stage loads its share from its rank's slots, and every
    layer holds what was computed."""
    p = prompt(1)
    first = engines()
    assert first.connector.setup.geometry.num_layers == 1  # a stage's layers
    first.add("computed", p)
    first.run()
    assert node_stats(node.socket)["tiers"]["host"]["blocks"] == 3 * STAGES
    engine = engines()
    assert first_step(engine, "again", p) == 3 * BLOCK
    [load] = engine.metas[0].loads
    ids = engine.block_ids("again")
    assert load.block_ids == ids[:3] and len(load.slots) == STAGES
    assert engine.values(ids[:3]) == expected_values(p)[:3]  # both layers, both stages
    engine.run()


@pytest.mark.support("pipeline-parallel", "hits", "vllm-objects")
def test_a_prefix_one_stage_lacks_is_not_promised(engines, node):
    """The node holds p's three blocks for stage 0 and its first block alone
    for stage 1: vLLM counts one block computed, not three."""
    p = prompt(2)
    engine = engines()
    hold(engine, node, p, rank=0, blocks=3)
    hold(engine, node, p, rank=1, blocks=1)
    assert first_step(engine, "partial", p) == BLOCK
    ids = engine.block_ids("partial")
    assert engine.values(ids[:1]) == expected_values(p)[:1]
    engine.run()
