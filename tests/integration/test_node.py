"""The node daemon as users run it: `kvbm node` processes on their own loopback
addresses with a real etcd, and engines attached over the unix socket. A
prefix an engine on node A computed reaches an engine on node B from A's host
tier, then from A's disk tier, bit-exact, and B's metrics count it."""

from __future__ import annotations

import os
import time

import pytest

from kvbm.block_key import GROUP_BLOCKS, Groups, KeySpace
from kvbm.connector.attach import Available, NodeAttachment, NodeError
from kvbm.engine_wire import geometry_to_wire
from kvbm.hashing import HASH_VERSION
from kvbm.layout import ModelGeometry
from tests.harness.node_daemon import kvbm_json, until
from tests.harness.support import GEOMETRY, Engine


@pytest.mark.parametrize("layout", ["mirror", "sharded"])
def test_a_prefix_reaches_another_node_from_the_peers_host_then_disk_tier(
    etcd, daemons, tmp_path, layout
):
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "3", "--disk-admit-min-uses", "1"]
    common += ["--index-layout", layout]
    # A: a host tier of 64 blocks (16 KiB each) and a disk tier behind it
    a_disk = ["--disk-cache-dir", str(tmp_path / "a-disk"), "--disk-cache-mb", "4"]
    a = daemons("node-a", "127.0.0.2", *common, "--host-cache-mb", "1", *a_disk)
    b = daemons("node-b", "127.0.0.3", *common, "--host-cache-mb", "4")
    eng_a = NodeAttachment(a.socket, GEOMETRY)
    eng_b = NodeAttachment(b.socket, GEOMETRY, remote=["host", "disk"])
    try:
        assert eng_a.num_slots == 64
        # engine 1 on A computes a prompt of 8 blocks
        first = eng_a.keys(list(range(1000, 1008)))
        made = Engine(8)
        assert eng_a.store(made.kv, first, made.compute(first)) == 8
        until(lambda: eng_b.lookup(first) == Available(0, 8), 10, "B never saw A's blocks")
        # A's background upkeep checksums them (stored without one)
        until(
            lambda: eng_a.stats()["tiers"]["host"]["unsummed"] == 0,
            10,
            "A's blocks were never sealed",
        )

        # engine 2 on B loads them from A's host tier
        got = Engine(8)
        loaded, sources = eng_b.load(got.kv, first, list(range(8)))
        assert loaded == 8 and sources["remote_host"] == 8
        assert all(got.holds(k, i) for i, k in enumerate(first))

        # a second prompt on A, then enough others that it spills to A's disk
        second = eng_a.keys(list(range(2000, 2008)))
        made = Engine(8)
        assert eng_a.store(made.kv, second, made.compute(second)) == 8
        filler = eng_a.keys(list(range(5000, 5000 + 2 * eng_a.num_slots)))
        big = Engine(len(filler))
        eng_a.store(big.kv, filler, big.compute(filler))
        until(lambda: eng_a.stats()["tiers"]["disk"]["blocks"] >= 8, 10, "A never spilled to disk")
        spilled = Available(0, 0, 8)
        until(lambda: eng_b.lookup(second) == spilled, 10, "B never saw the spilled blocks")
        got = Engine(8)
        loaded, sources = eng_b.load(got.kv, second, list(range(8)))
        assert loaded == 8 and sources["remote_disk"] == 8, sources
        assert all(got.holds(k, i) for i, k in enumerate(second))

        counted = eng_b.stats()["engine_blocks"]
        assert counted["remote_host"] == 8 and counted["remote_disk"] == 8
        # one pull from each of A's tiers, timed (kvbm_peer_pull_seconds)
        pulls = eng_b.stats()["peer_pulls"]
        assert [pulls[t]["count"] for t in ("host", "disk")] == [1, 1], pulls
        assert all(pulls[t]["seconds"] > 0 for t in ("host", "disk"))

        # `kvbm status`: the fleet from etcd, and one node from its socket; what
        # B pulled reaches the index at B's next flush (0.5 s)
        def fleet() -> dict:
            out = kvbm_json("status", "--etcd", etcd.endpoint, "--index-layout", layout)
            return {n["node_id"]: n for n in out["nodes"]}

        if layout == "mirror":
            until(lambda: fleet()["node-b"]["host"]["blocks"] == 16, 10, "B's blocks not indexed")
            assert fleet()["node-a"]["disk"]["blocks"] >= 8
        else:  # every location at its owner, once: A's and B's shares add up to what they hold

            def shares() -> list[dict]:
                return [e.stats()["index_shard"] for e in (eng_a, eng_b)]

            def settled() -> bool:
                s = shares()
                published = sum(x["locations_published"] for x in s)
                return published == sum(x["locations_owned"] for x in s) >= 16 + 16

            until(settled, 10, "the owners' tables never held every block published")
            assert all(e.stats()["index_shard"]["locations_owned"] for e in (eng_a, eng_b))
            assert fleet()["node-a"]["host"]["blocks"] is None  # not in etcd with this layout
        by_id = fleet()
        assert set(by_id) == {"node-a", "node-b"}
        one = kvbm_json("status", "--socket", b.socket)
        assert one["engine_blocks"]["remote_disk"] == 8 and one["hit_shares"]["remote_host"] == 0.5
        assert one["key_view"]["keys"] >= 16  # B's own blocks, and A's it knows of
        # SIGTERM: A stops cleanly and revokes its lease, so B forgets it at
        # once (well before the 3 s TTL)
        eng_a.close()
        t0 = time.monotonic()
        assert a.stop() == 0
        until(lambda: "node-a" not in eng_b.stats()["peers"], 2, "B still lists A")
        assert time.monotonic() - t0 < 3
        assert not os.path.exists(a.socket)
    finally:
        eng_a.close()
        eng_b.close()
    assert b.stop() == 0


def test_engines_share_a_node_and_a_mismatched_model_is_refused(daemons):
    node = daemons("solo", "127.0.0.2", "--host-cache-mb", "2")
    one = NodeAttachment(node.socket, GEOMETRY)
    two = NodeAttachment(node.socket, GEOMETRY)
    try:
        ks = one.keys(list(range(10)))
        made = Engine(10)
        assert one.store(made.kv, ks, made.compute(ks)) == 10
        got = Engine(10)
        assert two.load(got.kv, ks, list(range(10)))[0] == 10
        assert all(got.holds(k, i) for i, k in enumerate(ks))
        other = ModelGeometry(num_layers=3, num_kv_heads=2, head_dim=16, block_size=32)
        with pytest.raises(NodeError, match="needs a node of its own"):
            NodeAttachment(node.socket, other)
        # a malformed key is refused with a reason; the connection serves on
        with pytest.raises(NodeError, match="lookup"):
            one.link.call("lookup", {"keys": [b"\x01junk"]})
        # so is a well-formed key of another namespace or layout: an engine
        # stores and loads only under the key space its hello gave it
        foreign = KeySpace("elsewhere", GEOMETRY.fingerprint).keys([0])
        with pytest.raises(NodeError, match="not this node's"):
            one.link.call("reserve", {"keys": foreign})
        other_layout = KeySpace(one.space.namespace, other.fingerprint).keys([0])
        with pytest.raises(NodeError, match="not this node's"):
            one.link.call("load", {"keys": other_layout, "remote": []})
        # groups that do not name exactly the call's keys' anchors: refused
        # with the reason, nothing reserved or pinned, the connection serves on
        for call, body in (
            ("lookup", {"keys": ks, "remote": [], "groups": [0, 1, 2]}),  # one group too many
            ("reserve", {"keys": ks, "groups": [GROUP_BLOCKS, 1]}),  # offset out of range
            ("load", {"keys": ks, "remote": [], "groups": [0, -1]}),
            ("load_many", {"requests": [ks], "remote": [], "groups": [[0, 1], [0, 1]]}),
            ("load_many", {"requests": [ks], "remote": [], "groups": [[0, 1.5]]}),
        ):
            with pytest.raises(NodeError, match="groups"):
                one.link.call(call, body)
        assert one.stats()["engine_leases"] == 0
        assert one.lookup(ks, ask_node=True) == Available(10)
        # an engine that hashes block keys otherwise is refused, saying why:
        # another hash version (an older kvbm), or another key (the node
        # restarted on another fleet secret while the engine lived on)
        hello = {"geometry": geometry_to_wire(GEOMETRY), "engine": "test"}
        for hashing, why in (
            (None, r"version 1 \(it says none\)"),
            ({"version": 1}, "version 1"),
            ({"version": HASH_VERSION, "key_id": one.hasher.key.key_id ^ 1}, "another fleet"),
            ({"version": HASH_VERSION, "key_id": "x"}, "key id"),
        ):
            with pytest.raises(NodeError, match=why):
                one.link.call("hello", {**hello, "hash": hashing})
        with pytest.raises(NodeError, match="another fleet secret"):
            NodeAttachment(node.socket, GEOMETRY, key_id=one.hasher.key.key_id ^ 1)
        again = NodeAttachment(node.socket, GEOMETRY, key_id=one.hasher.key.key_id)
        assert again.hasher.key == two.hasher.key  # the same key for every engine
        again.close()
    finally:
        one.close()
        two.close()
    assert node.stop() == 0


def test_a_shared_group_lets_its_engines_attach(daemons):
    """The socket and the host arena go 0660 to the configured group, so engines
    need not run as the node's user; by default the arena is the node's alone."""
    import grp
    import stat

    gid = grp.getgrnam("nogroup").gr_gid
    shared = daemons("grouped", "127.0.0.2", "--host-cache-mb", "2", "--shared-group", "nogroup")
    private = daemons("private", "127.0.0.3", "--host-cache-mb", "2")
    one, two = NodeAttachment(shared.socket, GEOMETRY), NodeAttachment(private.socket, GEOMETRY)
    try:
        sock = os.stat(shared.socket)
        assert sock.st_gid == gid and stat.S_IMODE(sock.st_mode) == 0o660
        arena = os.stat(f"/dev/shm/{one.arena_name}")
        assert arena.st_gid == gid and stat.S_IMODE(arena.st_mode) == 0o660
        assert stat.S_IMODE(os.stat(f"/dev/shm/{two.arena_name}").st_mode) == 0o600
    finally:
        one.close()
        two.close()


def test_engines_name_their_keys_groups_and_a_sharded_fleet_keeps_a_group_at_one_owner(
    etcd, daemons
):
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "3", "--index-layout", "sharded"]
    a = daemons("node-a", "127.0.0.2", *common, "--host-cache-mb", "1")  # steps of 32 blocks
    b = daemons("node-b", "127.0.0.3", *common, "--host-cache-mb", "4")
    eng_a = NodeAttachment(a.socket, GEOMETRY)
    eng_b = NodeAttachment(b.socket, GEOMETRY, remote=["host", "disk"])
    try:
        hashes = list(range(7000, 7000 + 4 * GROUP_BLOCKS))
        ks, groups = eng_a.keys(hashes), Groups.of(hashes, 0, len(hashes))
        made = Engine(len(ks))
        assert eng_a.step_blocks < len(ks)  # the store goes in steps, each naming its own groups
        assert eng_a.store(made.kv, ks, made.compute(ks), groups) == len(ks)
        whole = Available(0, len(ks))
        until(lambda: eng_b.lookup(ks, groups=groups) == whole, 10, "B never found A's blocks")
        # each group sits whole at one owner
        owned = [e.stats()["index_shard"]["locations_owned"] for e in (eng_a, eng_b)]
        assert sum(owned) == len(ks) and all(n % GROUP_BLOCKS == 0 for n in owned), owned
        # asked without the groups, each key is its own: only a group's first key is found
        assert eng_b.lookup(ks, ask_node=True) == Available(0, 1)
        # a lookup from the middle of a group (an engine's own prefix hit before it)
        assert eng_b.lookup(ks[5:], groups=groups.part(5, len(ks) - 5)) == Available(0, len(ks) - 5)
        got = Engine(len(ks))
        loaded, sources = eng_b.load(got.kv, ks, list(range(len(ks))), groups)
        assert loaded == len(ks) and sources["remote_host"] == len(ks)
        assert all(got.holds(k, i) for i, k in enumerate(ks))

        # what B pulled keeps its groups: B's own locations join A's at the same owners
        def doubled() -> bool:
            owned = [e.stats()["index_shard"]["locations_owned"] for e in (eng_a, eng_b)]
            return sum(owned) == 2 * len(ks) and all(n % (2 * GROUP_BLOCKS) == 0 for n in owned)

        until(doubled, 10, "B's pulled blocks are not placed with their groups")
    finally:
        eng_a.close()
        eng_b.close()
    assert a.stop() == 0 and b.stop() == 0
