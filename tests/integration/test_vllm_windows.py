"""The connector with a KV cache group of windowed attention (sliding
window, chunked local), driven step by step by vLLM's real `Scheduler`
against a real `kvbm node` (tests/harness/vllm_steps.py). vLLM frees a
request's blocks behind the window and hands it its null block in their
place: a hit loads only the blocks the next token attends to, hits where
the prefix's early blocks are gone, and never saves the null block.

Every load is checked bit for bit against what the stand-in model computes
(`expected_values`); each test has its full-attention control on the same
node."""

from __future__ import annotations

import pytest
import torch
from vllm.v1.kv_cache_interface import (
    ChunkedLocalAttentionSpec,
    FullAttentionSpec,
    SlidingWindowSpec,
)
from vllm.v1.request import RequestStatus

from kvbm.connector.attach import NodeAttachment, node_stats
from kvbm.connector.attention_window import NULL_BLOCK
from tests.harness import vllm_runs as runs
from tests.harness.node_daemon import until
from tests.harness.vllm_steps import BLOCK, HEAD_SIZE, KV_HEADS, SteppedEngine, expected_values

WINDOW = 64  # tokens: 6 blocks computed, the next token sees blocks 4 and 5
REACH = WINDOW // BLOCK  # the stand-in model's blocks a sliding-window block attends to
SHAPE = {"block_size": BLOCK, "num_kv_heads": KV_HEADS, "head_size": HEAD_SIZE}
SLIDING = SlidingWindowSpec(**SHAPE, dtype=torch.float32, sliding_window=WINDOW)
CHUNKED = ChunkedLocalAttentionSpec(**SHAPE, dtype=torch.float32, attention_chunk_size=WINDOW)
FULL = FullAttentionSpec(**SHAPE, dtype=torch.float32)


def prompt(seed: int, n: int = 6 * BLOCK + 4) -> list[int]:
    return runs.prompt(seed, n)


def loads_of(engine: SteppedEngine, req_id: str) -> list:
    return [load for m in engine.metas for load in m.loads if load.req_id == req_id]


@pytest.mark.support("sliding-window", "hits", "vllm-objects")
@pytest.mark.parametrize("copies", ["sync", "async"])
def test_a_sliding_window_hit_loads_only_the_blocks_the_next_token_sees(engines, node, copies):
    """The node holds all six blocks of p; a sliding-window engine counts all
    six computed and loads blocks 4 and 5 alone (vLLM gave 0..3 its null
    block), which hold what was computed. Each step tells the workers that
    blocks may be reused (saves in flight finish reading first)."""
    p = prompt(1)
    first = engines(spec=SLIDING, reach=REACH)
    first.add("computed", p)
    first.run()
    assert all(NULL_BLOCK not in s.block_ids[0] for m in first.metas for s in m.saves)
    engine = engines(spec=SLIDING, reach=REACH, copies=copies)
    assert engine.admit("again", p) == 6 * BLOCK
    ids = engine.block_ids("again")
    assert ids[:4] == [NULL_BLOCK] * 4
    [load] = loads_of(engine, "again")
    assert load.block_ids == [ids[4:6]]
    assert engine.values(ids[4:6]) == expected_values(p, REACH)[4:6]
    assert node_stats(node.socket)["engine_blocks"]["local_host"] == 2
    assert all(m.blocks_reused for m in engine.metas)
    engine.run()


@pytest.mark.support("sliding-window", "hits", "vllm-objects")
@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_a_window_hits_where_the_prefixs_early_blocks_are_gone(engines, node, policy):
    """The node holds blocks 3..5 of p only. Full attention (the control, same
    node, same prompt) has no hit; the sliding window needs 4 and 5 and hits
    all six blocks: promised from the key view ("recompute"), or pinned
    before it is promised ("fail", or a view that cannot tell), the pin
    taking the window's blocks alone."""
    p = prompt(2)
    window = engines(spec=SLIDING, reach=REACH, policy=policy)
    window.hold(node.socket, p, [3, 4, 5])
    control = engines(spec=FULL, policy=policy)
    assert control.admit("full", p) == 0
    assert window.admit("windowed", p) == 6 * BLOCK
    ids = window.block_ids("windowed")
    [load] = loads_of(window, "windowed")
    assert load.block_ids == [ids[4:6]]
    assert window.values(ids[4:6]) == expected_values(p, REACH)[4:6]


@pytest.mark.support("sliding-window", "hits", "vllm-objects")
def test_a_prefix_the_window_cannot_serve_is_not_promised(engines, node):
    """Block 4 of p is missing: six blocks would need 4 and 5, five blocks 3
    and 4; four blocks need 2 and 3, held. vLLM counts four blocks computed
    and the connector loads 2 and 3."""
    p = prompt(3)
    window = engines(spec=SLIDING, reach=REACH)
    window.hold(node.socket, p, [0, 1, 2, 3, 5])
    assert window.admit("windowed", p) == 4 * BLOCK
    ids = window.block_ids("windowed")
    [load] = loads_of(window, "windowed")
    assert load.block_ids == [ids[2:4]]
    assert window.values(ids[2:4]) == expected_values(p, REACH)[2:4]
    window.run()


@pytest.mark.support("chunked-local", "hits", "vllm-objects")
def test_a_chunked_local_hit_loads_the_chunk_the_next_token_is_in(engines, node):
    """Chunks of 64 tokens: after five blocks the next token (160) is in the
    chunk of blocks 4 and 5, and sees block 4 alone."""
    p = prompt(4, 5 * BLOCK + 4)
    engines(spec=FULL).hold(node.socket, p, [0, 1, 2, 3, 4])
    engine = engines(spec=CHUNKED)
    assert engine.admit("chunked", p) == 5 * BLOCK
    ids = engine.block_ids("chunked")
    [load] = loads_of(engine, "chunked")
    assert ids[:4] == [NULL_BLOCK] * 4 and load.block_ids == [ids[4:5]]
    assert engine.values(ids[4:5]) == expected_values(p)[4:5]
    engine.run()


@pytest.mark.support("sliding-window", "remote", "vllm-objects")
def test_a_remote_sliding_window_hit_pulls_only_the_window_from_the_peer(model, etcd, daemons):
    """Node A holds p's six blocks; engines on node B pull from A. A
    full-attention engine pulls all six; a sliding-window engine of the same
    size pulls blocks 4 and 5 alone: a third of the bytes."""
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "3", "--host-cache-mb", "8"]
    a = daemons("node-a", "127.0.0.2", *common)
    b = daemons("node-b", "127.0.0.3", *common)
    p, q = prompt(7), prompt(8)
    made = [SteppedEngine(model, a.socket, spec=FULL)]
    try:
        made.append(SteppedEngine(model, a.socket, spec=SLIDING, reach=REACH))
        made[0].hold(a.socket, p, list(range(6)))
        made[1].hold(a.socket, q, list(range(6)))
        on_b = NodeAttachment(b.socket, made[0].connector.setup.geometry, remote=["host"])
        try:
            seed = on_b.hasher.seed(made[0].connector.setup.model_identity)
            for tokens in (p, q):
                keys = on_b.keys(on_b.hasher.sequence_hashes(tokens, BLOCK, seed))
                until(lambda k=keys: on_b.lookup(k, ask_node=True).total == 6, 10, "B's index")
            # B's key view names peers' keys once its index mirror is whole
            # (until then a scheduler pins before it promises: the whole prefix)
            until(lambda: on_b.held(keys) is not None, 30, "B's view of peers' keys")
        finally:
            on_b.close()
        pulled = {}
        for name, spec, tokens, reach in (("full", FULL, p, 1), ("sliding", SLIDING, q, REACH)):
            engine = SteppedEngine(model, b.socket, spec=spec, remote="host", reach=reach)
            made.append(engine)
            before = node_stats(b.socket).get("engine_blocks", {}).get("remote_host", 0)
            assert engine.admit(name, tokens) == 6 * BLOCK
            ids = engine.block_ids(name)
            assert engine.values(ids[4:6]) == expected_values(tokens, reach)[4:6]
            engine.run()
            pulled[name] = node_stats(b.socket)["engine_blocks"]["remote_host"] - before
        block_bytes = made[0].connector.setup.geometry.block_bytes
        assert pulled == {"full": 6, "sliding": 2}, pulled
        print(f"bytes pulled: full {6 * block_bytes}, sliding window {2 * block_bytes}")
    finally:
        for engine in made:
            engine.close()


@pytest.mark.support("sliding-window", "hits", "vllm-objects")
def test_vllms_own_prefix_hit_behind_a_window_saves_no_null_block(engines, node):
    """With vLLM's prefix cache, a second request extending p finds p's window
    in the engine and null blocks behind it: the connector saves its new
    blocks, and never the null block under a key."""
    p = prompt(5)
    engine = engines(spec=SLIDING, reach=REACH, prefix_caching=True)
    engine.add("p", p)
    engine.run()
    longer = p[: 6 * BLOCK] + prompt(6, 2 * BLOCK + 4)
    engine.add("longer", longer, max_tokens=4)
    engine.run()
    saves = [s for m in engine.metas for s in m.saves if s.req_id == "longer"]
    assert saves, "the longer prompt's new blocks were never saved"
    assert all(NULL_BLOCK not in s.block_ids[0] for s in saves)
    probe = engines(spec=SLIDING, reach=REACH)
    assert probe.admit("probe", longer) == 8 * BLOCK
    ids = probe.block_ids("probe")
    assert probe.values(ids[6:8]) == expected_values(longer, REACH)[6:8]


def test_a_window_load_that_fails_is_recomputed_whole(engines, node, monkeypatch):
    """The view shows p's six blocks and they are evicted between the promise
    and the step's pin (the race forced here). vLLM rolls a failed block back
    to that block, and behind it the window's blocks were never loaded (its
    null block): so the load fails whole (`failed_waits`), vLLM recomputes p
    from its first token, and every block holds what a model attending two
    blocks back computes."""
    p = prompt(9)
    engines(spec=SLIDING, reach=REACH).hold(node.socket, p, list(range(6)))
    engine = engines(spec=SLIDING, reach=REACH)
    probe = NodeAttachment(node.socket, engine.connector.setup.geometry)
    evict = engine.evict_after_promising(probe, "p", slice(4, 6))
    monkeypatch.setattr(engine.connector, "update_state_after_alloc", evict)
    try:
        engine.add("p", p)
        engine.step()
        monkeypatch.undo()
        assert engine.metas[0].failed_waits == ["p"] and not engine.metas[0].failed
        engine.step()  # received (failed): vLLM schedules p again, from its first token
        [again] = engine.outputs[-1].scheduled_new_reqs
        assert again.num_computed_tokens == 0
        assert engine.values(engine.block_ids("p")[4:6]) == expected_values(p, REACH)[4:6]
        engine.run()
    finally:
        probe.close()
    # its blocks, recomputed, are saved again (the node had lost them)
    assert sum(len(s.seq_hashes) for m in engine.metas for s in m.saves if s.req_id == "p") == 6


@pytest.mark.parametrize(
    ("policy", "copies"), [("fail", "sync"), ("recompute", "sync"), ("recompute", "async")]
)
def test_window_requests_aborted_while_waiting_leave_no_leases(engines, node, policy, copies):
    """Four node-held prompts at once into an 8-block cache under a window:
    after a step some wait for room and some for their loads, and all four
    are aborted. Every request is forgotten, its blocks come back to vLLM,
    and no lease is left in the node."""
    prompts = [prompt(40 + i) for i in range(4)]
    holder = engines(spec=SLIDING, reach=REACH)
    for p in prompts:
        holder.hold(node.socket, p, list(range(6)))
    engine = engines(spec=SLIDING, reach=REACH, num_blocks=8, policy=policy, copies=copies)
    ids = [f"w{i}" for i in range(len(prompts))]
    for req_id, p in zip(ids, prompts, strict=True):
        engine.add(req_id, p, max_tokens=48)
    engine.step()
    states = {engine.scheduler.requests[r].status for r in ids}
    waits = {RequestStatus.WAITING, RequestStatus.WAITING_FOR_REMOTE_KVS}
    assert states == waits, f"{states}: the case under test did not happen"
    engine.abort(ids)
    engine.run()
    assert not engine.connector.requests
    assert node_stats(node.socket)["engine_leases"] == 0
