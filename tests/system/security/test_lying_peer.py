"""Issue 14, finding 4: a puller trusted the numbers in a peer's pin reply. A
peer with the secret (registered in etcd like any node, holding real blocks)
answers every pin with a wrong length or offset; a real `kvbm node` that
pulls from it refuses the pins: its own blocks beside the slot it reserved
stay bit-exact, no slot is left reserved for ever, the engine recomputes,
and the node serves on."""

from __future__ import annotations

import pytest

from kvbm.connector.attach import Available, NodeAttachment
from tests.harness.lying_peer import liar
from tests.harness.node_daemon import until
from tests.harness.peer_attacks import write_secret
from tests.harness.support import GEOMETRY, SPACE, Engine, keys

N = 8
HOST_MB = 1


@pytest.mark.parametrize("lie", ["long", "negative", "outside"])
def test_a_peers_pin_reply_is_checked_before_it_is_read_from(lie, etcd, daemons, tmp_path):
    secret = write_secret(tmp_path / "secret")
    with liar(etcd.endpoint, "127.0.0.2", secret, lie, N):
        flags = ["--etcd", etcd.endpoint, "--secret-file", secret, "--lease-ttl", "5"]
        flags += ["--namespace", SPACE.namespace, "--host-cache-mb", str(HOST_MB)]
        node = daemons("victim", "127.0.0.3", *flags)
        engine = NodeAttachment(node.socket, GEOMETRY, remote=["host"])
        try:
            capacity = engine.stats()["tiers"]["host"]["capacity"]
            # the victim's own blocks sit right after one free slot: slot 0 is
            # reserved and given back, so the pull's reservation takes it
            hole = engine.link.call("reserve", {"keys": keys(900, 1)})
            own = keys(1000, 8)
            made = Engine(len(own))
            assert engine.store(made.kv, own, made.compute(own)) == len(own)
            engine.link.call("commit", {"lease": hole["lease"], "ok": False})

            wanted = keys(0, N)
            until(lambda: engine.lookup(wanted) == Available(0, N), 10, "the liar is not seen")
            got = Engine(N)
            loaded, sources = engine.load(got.kv, wanted, list(range(N)))
            assert loaded == 0 and not sources.get("remote_host"), "a lying pin was read from"
            assert f"peer's pins refused peer=kvbm-liar-{lie}" in node.log()

            # the victim's own blocks are intact, bit for bit
            back = Engine(len(own))
            assert engine.load(back.kv, own, list(range(len(own))))[0] == len(own)
            assert all(back.holds(k, i) for i, k in enumerate(own))
            # and no slot is left reserved: the whole tier still takes new blocks
            fill = keys(5000, capacity)
            many = Engine(capacity)
            assert engine.store(many.kv, fill, many.compute(fill)) == capacity
            assert engine.stats()["engine_leases"] == 0
        finally:
            engine.close()
