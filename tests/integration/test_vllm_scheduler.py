"""The connector's scheduler side, driven step by step by vLLM's real
`Scheduler` against a real `kvbm node`, with no model and no engine
process (tests/vllm_steps.py): promises, holds after a failed load,
preemption with saves in flight, aborts, the blocks of generated tokens,
and partial hits beside vLLM's own prefix cache. Each test takes seconds.

Every load is checked bit for bit against what the stand-in model computes
(`expected_values`), so a block saved over KV that never loaded shows up
as a wrong value in the engine that loads it next."""

from __future__ import annotations

import time

import pytest
from vllm.v1.request import RequestStatus

from kvbm.connector.attach import Available, NodeAttachment, node_stats
from kvbm.connector.copy import ArenaBlocks
from kvbm.connector.vllm.stats import NOT_CACHED, KvbmStats
from tests.harness.node_daemon import until
from tests.harness.vllm_runs import prompt
from tests.harness.vllm_steps import BLOCK, SteppedEngine, expected_values


def computed(engine: SteppedEngine, node, prompts: list[list[int]]) -> None:
    """`engine` computes `prompts` one after another, saving their blocks."""
    for i, p in enumerate(prompts):
        engine.add(f"computed-{i}", p)
        engine.run()
        until_in_view(engine, node, p, (len(p) - 1) // BLOCK)


def until_in_view(
    engine: SteppedEngine, node, tokens: list[int], blocks: int, held: int | None = None
) -> None:
    """Wait until the node's key view (what a scheduler reads) shows the
    first `blocks` blocks of `tokens` as `engine` keys them: a scheduler
    that finds a bucket of the view not yet written asks the node and pins
    at once, which is another path than the ones under test."""
    hasher = engine.connector.link.hasher
    assert hasher is not None
    seed = hasher.seed(engine.connector.setup.model_identity)
    probe = NodeAttachment(node.socket, engine.connector.setup.geometry, map_arena=False)
    try:
        keys = probe.keys(hasher.sequence_hashes(tokens, BLOCK, seed)[:blocks])
        want = Available(blocks if held is None else held)
        until(lambda: probe.seen(keys) == want, 10, "the key view lags")
    finally:
        probe.close()


def first_step_computed_tokens(engine: SteppedEngine, req_id: str) -> int:
    """The tokens vLLM counted computed when it first scheduled the request
    (its own prefix-cache hit and what the connector loads)."""
    for out in engine.outputs:
        for new in out.scheduled_new_reqs:
            if new.req_id == req_id:
                return new.num_computed_tokens
    raise AssertionError(f"{req_id} was never scheduled")


@pytest.mark.support("full-attention", "hits", "vllm-objects")
@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_a_prompt_the_node_holds_is_loaded_in_its_first_step(engines, node, policy):
    """A node-held prompt's full blocks (100 tokens: 3) count as computed at
    once, load before the step's forward, and hold what was computed. With
    "recompute" they are promised from the key view and pinned with the
    step; with "fail" pinned before they are promised."""
    p = prompt(1)
    computed(engines(), node, [p])
    engine = engines(policy=policy)
    engine.add("again", p)
    engine.step()
    assert first_step_computed_tokens(engine, "again") == 3 * BLOCK
    assert engine.outputs[0].num_scheduled_tokens["again"] == len(p) - 3 * BLOCK
    [load] = engine.metas[0].loads
    ids = engine.block_ids("again")
    assert load.block_ids == [ids[:3]] and not engine.metas[0].failed
    assert engine.values(ids[:3]) == expected_values(p)[:3]
    stats = node_stats(node.socket)
    assert stats["engine_blocks"]["local_host"] == 3
    assert stats["engine_leases"] == 0  # the step's pins were released after the copy
    engine.run()


def test_a_promise_the_node_cannot_pin_holds_the_requests_saves_until_recomputed(
    engines, node, monkeypatch
):
    """The key view shows p's first two blocks, and they are evicted between
    the promise and the step's pin (the race forced here): the workers
    report the promised blocks failed and vLLM recomputes from block 0.
    Blocks 2 and 3, computed in that first step over blocks that never
    loaded, must not be saved; once vLLM has recomputed, every block is
    saved right and the next engine loads all four."""
    p = prompt(2, 4 * BLOCK + 4)
    first = engines()
    computed(first, node, [p[: 2 * BLOCK + 10]])  # the node holds p's first two blocks
    until_in_view(first, node, p, 4, held=2)  # the view can tell: the scheduler promises
    engine = engines()
    probe = NodeAttachment(node.socket, engine.connector.setup.geometry)
    evict = engine.evict_after_promising(probe, "p", slice(0, 2))
    monkeypatch.setattr(engine.connector, "update_state_after_alloc", evict)
    try:
        engine.add("p", p)
        engine.step()
        monkeypatch.undo()
        ids = engine.block_ids("p")
        first = engine.metas[0]
        assert first.failed == ids[:2] and not first.loads  # the promise came to nothing
        assert not first.saves, "saved KV computed over blocks that never loaded"
        engine.step()  # vLLM computes p again from block 0
        assert first_step_computed_tokens(engine, "p") == 2 * BLOCK
        assert engine.metas[1].released == ["p"]
        engine.run()
    finally:
        probe.close()
    again = engines()
    again.add("again", p)
    again.step()
    assert first_step_computed_tokens(again, "again") == 4 * BLOCK
    assert again.values(again.block_ids("again")[:4]) == expected_values(p)[:4]


def test_saves_in_flight_finish_reading_before_a_preempted_requests_blocks_are_reused(
    engines, node, monkeypatch
):
    """engine_copies "async" (a GPU's default): a save reads its blocks on
    the copy thread after its step. Copies are slowed here so that the save
    of a block a request has just filled is still in flight when vLLM
    preempts that request (four prompts in an 11-block cache, 48 tokens
    each) and hands the block to another request, whose forward writes it
    at once. The step's metadata says so, the workers wait for the saves to
    have read first, and every block the node holds, prompt and answer, is
    the one computed."""
    gather = ArenaBlocks.gather

    def slow_gather(self, *args, **kwargs):
        time.sleep(0.05)
        return gather(self, *args, **kwargs)

    monkeypatch.setattr(ArenaBlocks, "gather", slow_gather)
    prompts = [prompt(20 + i, 4 * BLOCK + 4) for i in range(4)]
    engine = engines(num_blocks=12, copies="async")
    requests = [engine.add(f"r{i}", p, max_tokens=48) for i, p in enumerate(prompts)]
    engine.run()
    monkeypatch.undo()
    preempting = [i for i, out in enumerate(engine.outputs) if out.preempted_req_ids]
    assert preempting, "vLLM never preempted: the case under test did not happen"
    assert all(engine.metas[i].blocks_reused for i in preempting)
    assert node_stats(node.socket)["engine_leases"] == 0
    check = engines()
    answered = [list(r.all_token_ids) for r in requests]  # 180 tokens: 5 blocks with KV
    for i, tokens in enumerate(answered):
        until_in_view(engine, node, tokens, 5)
        check.add(f"check-{i}", tokens, max_tokens=2)
    check.step()
    for i, tokens in enumerate(answered):
        assert first_step_computed_tokens(check, f"check-{i}") == 5 * BLOCK
        ids = check.block_ids(f"check-{i}")[:5]
        assert check.values(ids) == expected_values(tokens)[:5], f"request {i} saved wrong KV"


@pytest.mark.parametrize(
    ("policy", "copies"), [("fail", "sync"), ("recompute", "sync"), ("recompute", "async")]
)
def test_requests_aborted_while_waiting_leave_no_leases(engines, node, policy, copies):
    """Four node-held prompts at once into an 11-block cache: after one step
    some wait for room, and all four are aborted. With "fail" the connector
    pinned a waiting request's hit before promising it: the abort
    (request_finished) settles that lease, not the connection's end. With
    "recompute" nothing is pinned while a request waits. With async copies
    the scheduled requests' saves are still in flight at the abort: their
    blocks come back to vLLM once the saves end, and no lease is left."""
    prompts = [prompt(30 + i, 4 * BLOCK + 4) for i in range(4)]
    computed(engines(), node, prompts)
    engine = engines(num_blocks=12, policy=policy, copies=copies)
    ids = [f"w{i}" for i in range(len(prompts))]
    for req_id, p in zip(ids, prompts, strict=True):
        engine.add(req_id, p, max_tokens=48)
    engine.step()
    waiting = [r for r in ids if engine.scheduler.requests[r].status == RequestStatus.WAITING]
    assert waiting, "every request was scheduled: the case under test did not happen"
    held = node_stats(node.socket)["engine_leases"]
    if policy == "fail":
        assert held > 0  # the waiting request's pin
    elif copies == "sync":
        assert held == 0
    engine.abort(ids)
    engine.run()
    assert not engine.connector.requests
    assert node_stats(node.socket)["engine_leases"] == 0


def test_a_chats_next_turn_loads_the_blocks_of_the_answer_too(engines, node):
    """Turn 1 (100 prompt tokens, a 64-token answer) on one engine; turn 2
    (turn 1, its answer, a new message) on another loads every full block
    of turn 1's prompt and answer: 5, the last answer token having no KV."""
    turn1 = prompt(5)
    first = engines()
    request = first.add("turn1", turn1, max_tokens=64)
    first.run()
    answer = list(request.output_token_ids)
    turn2 = turn1 + answer + prompt(6, 40)
    full = (len(turn1) + len(answer) - 1) // BLOCK
    assert full == 5
    until_in_view(first, node, turn2, full)
    engine = engines()
    engine.add("turn2", turn2)
    engine.step()
    assert first_step_computed_tokens(engine, "turn2") == full * BLOCK
    assert engine.values(engine.block_ids("turn2")[:full]) == expected_values(turn2)[:full]


def test_beside_vllms_prefix_cache_the_connector_loads_only_what_vllm_lacks(engines, node):
    """vLLM's prefix cache on: y (sharing x's first two blocks) loads those
    two from the node; then x gets them from vLLM's own cache, and the
    connector loads x's blocks 2 and 3 only (`num_computed_tokens` > 0)."""
    x = prompt(7, 4 * BLOCK + 4)
    y = x[: 2 * BLOCK] + prompt(8, BLOCK + 4)
    computed(engines(), node, [x])
    engine = engines(prefix_caching=True)
    engine.add("y", y, max_tokens=1)
    engine.run()
    assert [load.count for load in engine.metas[0].loads] == [2]
    engine.add("x", x)
    engine.step()
    assert first_step_computed_tokens(engine, "x") == 4 * BLOCK
    ids = engine.block_ids("x")
    [load] = engine.metas[-1].loads
    assert load.block_ids == [ids[2:4]]
    assert engine.values(ids[:4]) == expected_values(x)[:4]
    assert node_stats(node.socket)["engine_blocks"]["local_host"] == 4  # 2 for y, 2 for x


def test_the_connectors_counts_add_up_as_vllm_sums_them():
    # vLLM's stats base class: here, not in the unit tier, which runs without vLLM
    one, two = KvbmStats(), KvbmStats()
    assert one.is_empty()
    one.count(NOT_CACHED)
    two.count(NOT_CACHED, 2)
    assert one.aggregate(two).reduce() == {NOT_CACHED: 3}
