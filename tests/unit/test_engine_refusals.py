"""A connector that turns itself off tells its node why (`refused` on the
engine wire), and the node keeps what it was told for `kvbm status`: the
body is checked like every other (a malformed one is refused with a clear
error, on a connection that goes on serving), and the table it lands in
stays bounded however many refusals an engine sends."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm.config import load_config
from kvbm.engine_wire import (
    MAX_MODEL_CHARS,
    MAX_REASON_CHARS,
    REFUSAL_KINDS,
    EngineLink,
    NodeError,
    Refusal,
)
from kvbm.hashing import HashKey
from kvbm.metrics import EngineRefusals
from kvbm.node.engine_server import EngineServer
from kvbm.node.refusals import MAX_REFUSALS, Refusals
from kvbm.status import render

PP = Refusal(
    "llama-8b",
    "kvbm does not store KV caches split by decode_context_parallel_size > 1 yet",
    "kv_cache",
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def expect_refused(body: dict, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        Refusal.from_wire(body)


def test_a_repeated_refusal_is_one_entry_counted():
    table = Refusals(clock=Clock())
    # the same engine restarted three times, then another model
    assert table.add(PP) is True
    assert table.add(PP) is False and table.add(PP) is False
    pp = Refusal("qwen", "kvbm does not store KV caches split by pipeline", "kv_cache")
    assert table.add(pp) is True
    listed = table.listed()
    assert [(r["model"], r["count"]) for r in listed] == [("qwen", 1), ("llama-8b", 3)]
    assert listed[1]["last_seen"] == 1003.0  # the third time it was told
    assert table.counts() == {"kv_cache": 4, "model_identity": 0}


def test_the_table_keeps_the_last_distinct_refusals_and_never_grows():
    table = Refusals(clock=Clock())
    table.add(PP)
    # an engine sends ten thousand distinct reasons; PP's engine restarts
    # every tenth of them, so its entry stays among the newest
    for i in range(10_000):
        table.add(Refusal("spam", f"reason {i}", "model_identity"))
        if i % 10 == 0:
            table.add(PP)
        assert len(table.listed()) <= MAX_REFUSALS
    listed = table.listed()
    assert len(listed) == MAX_REFUSALS
    assert listed[0]["reason"] == "reason 9999"
    assert any(r["model"] == "llama-8b" and r["count"] == 1001 for r in listed)
    assert not any(r["reason"] == "reason 0" for r in listed)  # the oldest went
    # the counter counts what went too (Prometheus counters never go down)
    assert table.counts() == {"kv_cache": 1001, "model_identity": 10_000}


def test_the_metric_is_labelled_by_kind_only():
    table = Refusals()
    table.add(PP)
    [family] = EngineRefusals(table.counts).collect()
    samples = {s.labels["kind"]: s.value for s in family.samples}
    assert samples == {"kv_cache": 1, "model_identity": 0}
    assert {name for s in family.samples for name in s.labels} == {"kind"}


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"model": "m", "reason": "r"}, "map of model, reason and kind"),
        ({"model": "m", "reason": "r", "kind": "kv_cache", "more": 1}, "map of model"),
        ({"model": "m", "reason": "r", "kind": "because"}, "kind is one of"),
        ({"model": "m", "reason": "r", "kind": ["kv_cache"]}, "kind is one of"),
        ({"model": 7, "reason": "r", "kind": "kv_cache"}, "model must be text"),
        ({"model": "m", "reason": b"r", "kind": "kv_cache"}, "reason must be text"),
        ({"model": "", "reason": "r", "kind": "kv_cache"}, "model must be text"),
        ({"model": "m" * (MAX_MODEL_CHARS + 1), "reason": "r", "kind": "kv_cache"}, "over 256"),
        ({"model": "m", "reason": "r" * (MAX_REASON_CHARS + 1), "kind": "kv_cache"}, "over 512"),
        ({"model": "m", "reason": "two\nlines", "kind": "kv_cache"}, "printable"),
        ({"model": "\x1b[2Jm", "reason": "r", "kind": "kv_cache"}, "printable"),
        ({"model": "m", "reason": "right\u202eto left", "kind": "kv_cache"}, "printable"),
    ],
)
def test_a_malformed_refusal_is_refused_saying_why(body, says):
    expect_refused(body, says)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=2000), st.text(max_size=2000), st.sampled_from(REFUSAL_KINDS))
def test_whatever_an_exception_says_the_engine_sends_what_the_node_takes(model, reason, kind):
    clipped = Refusal.clipped(model, reason, kind)
    assert Refusal.from_wire(clipped.to_wire()) == clipped


def test_the_server_answers_a_bad_refusal_with_an_error_and_keeps_serving(tmp_path):
    """Over the node's real socket, before any hello: a bad body gets an
    error naming the call and the fault, and the same connection then has
    good refusals taken and shown in the node's stats."""
    cfg = load_config(env={}, overrides={"socket": str(tmp_path / "n" / "node.sock")})

    async def no_tiers(geometry):
        raise AssertionError("a refusal never builds the tiers")

    async def scenario() -> None:
        server = EngineServer(cfg, "solo", no_tiers, lambda: {}, HashKey.derive(b"k" * 32))
        server.stats = lambda: {"refusals": server.refusals.listed()}
        await server.start()
        link = EngineLink(cfg.socket, timeout=5.0)

        async def call(name: str, body: dict) -> dict:
            return await asyncio.to_thread(link.call, name, body)

        try:
            bad = {"model": "m", "reason": "line\nbreak", "kind": "kv_cache"}
            with pytest.raises(NodeError) as refused:
                await call("refused", bad)
            assert str(refused.value) == (
                "refused: a refusal's reason must be printable text on one line"
            )
            assert link.connected  # the node answered; it did not hang up
            await call("refused", PP.to_wire())
            await call("refused", PP.to_wire())
            listed = (await call("stats", {}))["refusals"]
            assert [(r["model"], r["count"]) for r in listed] == [("llama-8b", 2)]
            with pytest.raises(NodeError, match="say hello first"):
                await call("lookup", {"keys": []})  # a refusal is no hello
        finally:
            link.close()
            await server.close()

    asyncio.run(scenario())


def test_status_shows_each_refusal_on_a_line():
    table = Refusals()
    table.add(PP)
    table.add(PP)
    table.add(Refusal("qwen", "no identity", "model_identity"))
    node = {"node_id": "solo", "namespace": "default", "index": "memory"}
    shown = render({**node, "engine_refusals": table.listed()})
    assert shown.splitlines()[-3:] == [
        "  no engine has attached yet",
        "  engine refused: qwen: no identity (1 time)",
        "  engine refused: llama-8b: kvbm does not store KV caches split by "
        "decode_context_parallel_size > 1 yet (2 times)",
    ]
