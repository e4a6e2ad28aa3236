"""A slow peer (SIGSTOP: alive, connected, answering nothing) costs a puller
one timeout, no hang; the peer is then left alone for a short back-off (no
more timeouts), and used again once it answers (SIGCONT)."""

from __future__ import annotations

import signal
import time

from kvbm.connector.attach import Available, NodeAttachment
from tests.harness.node_daemon import until
from tests.harness.support import GEOMETRY, Engine


def test_a_frozen_peer_costs_one_timeout_then_is_left_alone_until_it_may_be_back(etcd, daemons):
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "30"]  # A stays in the index while frozen
    a = daemons("node-a", "127.0.0.2", *common, "--host-cache-mb", "2")
    b = daemons(
        "node-b",
        "127.0.0.3",
        *common,
        "--host-cache-mb",
        "2",
        "--peer-timeout-ms",
        "500",
        "--peer-backoff-s",
        "2",
    )
    eng_a = NodeAttachment(a.socket, GEOMETRY)
    eng_b = NodeAttachment(b.socket, GEOMETRY, remote=["host"])
    try:
        ks = eng_a.keys(list(range(300, 308)))
        made = Engine(8)
        assert eng_a.store(made.kv, ks, made.compute(ks)) == 8
        until(lambda: eng_b.lookup(ks) == Available(0, 8), 10, "B never saw A's blocks")
        a.proc.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            assert eng_b.load(Engine(8).kv, ks, list(range(8)))[0] == 0  # a miss, no hang
            assert time.monotonic() - t0 < 10
            assert eng_b.stats()["avoided_peers"] == ["node-a"]
            # while left alone, A is not asked: lookups and loads say "not here"
            assert eng_b.lookup(ks, ask_node=True) == Available(0)
            assert eng_b.load(Engine(8).kv, ks, list(range(8)))[0] == 0
        finally:
            a.proc.send_signal(signal.SIGCONT)
        until(lambda: eng_b.stats()["avoided_peers"] == [], 10, "A left alone for good")
        got = Engine(8)
        loaded, sources = eng_b.load(got.kv, ks, list(range(8)))
        assert loaded == 8 and sources["remote_host"] == 8
        assert all(got.holds(k, i) for i, k in enumerate(ks))
    finally:
        eng_a.close()
        eng_b.close()
