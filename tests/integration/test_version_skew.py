"""Version skew, as a rolling upgrade has it: nodes and engines of this
release beside those of the previous one (main at old_tree.PREVIOUS, built
from git into the test's directory and run with this virtual environment),
on a real etcd, on loopback addresses. Engines are the cheap engine of
tests/harness/support.py, every byte checked; the real vLLM pair is
tests/system/test_version_skew_vllm.py.

Every pair of the two releases works: an old engine on a new node, a new
engine on an old node, pulls from old to new and from new to old, and the
disk tier's file read back across an upgrade and a downgrade. A release
two versions away (acted by tests/harness/versioned_node.py) is refused by
every side, each refusal naming both versions, and the engines recompute.
"""

from __future__ import annotations

import pytest

from kvbm.connector.attach import Available, NodeAttachment, NodeError
from kvbm.node_process import fleet_secret
from kvbm.versions import Compatibility
from tests.harness import versioned_node
from tests.harness.node_daemon import kvbm_json, spill, until
from tests.harness.old_tree import NODE, PREVIOUS_PROTOCOL, old_engine, old_env, old_tree
from tests.harness.support import GEOMETRY, Engine

K1 = list(range(1000, 1008))  # a prompt's sequence hashes: 8 blocks
K2 = list(range(2000, 2008))
K3 = list(range(3000, 3008))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return old_tree(tmp_path_factory.mktemp("previous"))


def loads_all(att: NodeAttachment, hashes: list[int], source: str) -> bool:
    """Whether `att` loads every block of `hashes`, all from `source`, bit-exact."""
    ks = att.keys(hashes)
    got = Engine(len(ks))
    loaded, sources = att.load(got.kv, ks, list(range(len(ks))))
    return (
        loaded == len(ks)
        and sources.get(source) == len(ks)
        and all(got.holds(k, i) for i, k in enumerate(ks))
    )


def expect_old_engine(answer: dict, loaded: int, source: str | None = None) -> None:
    assert answer["error"] is None, answer
    assert answer["loaded"] == loaded, answer
    if loaded:
        assert answer["exact"] and answer["sources"][source] == loaded, answer


def test_engines_and_pulls_between_this_release_and_the_previous_one(tree, etcd, daemons):
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "3", "--host-cache-mb", "2"]
    old = daemons("node-old", "127.0.0.2", *common, command=NODE, env=old_env(tree))
    new = daemons("node-new", "127.0.0.3", *common)
    # the old node says no version (it predates them): read as the previous one
    assert "protocol" not in kvbm_json("status", "--socket", old.socket)
    assert kvbm_json("status", "--socket", new.socket)["protocol"] == 2

    # a new engine on the old node stores a prompt and loads it back
    on_old = NodeAttachment(old.socket, GEOMETRY, remote=["host"])
    on_new = NodeAttachment(new.socket, GEOMETRY, remote=["host"])
    try:
        assert on_old.protocol == PREVIOUS_PROTOCOL
        made = Engine(len(K1))
        assert on_old.store(made.kv, on_old.keys(K1), made.compute(on_old.keys(K1))) == 8
        assert loads_all(on_old, K1, "local_host")

        # an old engine on the new node does the same
        expect_old_engine(
            old_engine(tree, {"socket": new.socket, "store": K2, "load": K2}), 8, "local_host"
        )

        # the new node pulls the first prompt from the old node ...
        until(lambda: on_new.lookup(on_new.keys(K1)) == Available(0, 8), 10, "new never saw K1")
        assert loads_all(on_new, K1, "remote_host")
        # ... and the old node pulls the second from the new node
        order = {"socket": old.socket, "remote": ["host"], "load": K2}
        expect_old_engine(old_engine(tree, order), 8, "remote_host")
        assert on_new.stats()["engine_blocks"]["remote_host"] == 8
        # the new node counts the old engine's hello (it said no version: 1)
        assert on_new.stats()["engine_hellos_by_protocol"] == {"1": 1, "2": 1}
    finally:
        on_old.close()
        on_new.close()
    # the fleet as `kvbm status` shows it: each node's protocol
    nodes = kvbm_json("status", "--etcd", etcd.endpoint)["nodes"]
    assert {n["node_id"]: n["protocol"] for n in nodes} == {"node-old": 1, "node-new": 2}


def test_the_disk_tier_is_read_back_across_an_upgrade_and_a_downgrade(tree, daemons, tmp_path):
    # One node's disk file, written by one release and recovered by the other
    # when the node restarts on it (a DaemonSet's pod replaced on its hostPath).
    flags = [*fleet_secret(str(tmp_path)), "--host-cache-mb", "1", "--disk-admit-min-uses", "1"]
    flags += ["--disk-cache-dir", str(tmp_path / "disk"), "--disk-cache-mb", "4"]

    def spilled(att: NodeAttachment, hashes: list[int]) -> None:
        spill(att, att.keys(hashes))
        until(lambda: att.lookup(att.keys(hashes), ask_node=True).local == 8, 10, "not kept")
        until(lambda: att.stats()["tiers"]["disk"]["blocks"] >= 8, 10, "never spilled")

    old = daemons("node-x", "127.0.0.2", *flags, command=NODE, env=old_env(tree))
    on_old = NodeAttachment(old.socket, GEOMETRY)
    try:
        spilled(on_old, K1)  # written by the previous release
    finally:
        on_old.close()
    assert old.stop() == 0
    new = daemons("node-x", "127.0.0.2", *flags)  # upgraded
    on_new = NodeAttachment(new.socket, GEOMETRY)
    try:
        assert loads_all(on_new, K1, "local_disk")
        spilled(on_new, K2)  # written by this release
    finally:
        on_new.close()
    assert new.stop() == 0
    again = daemons("node-x", "127.0.0.2", *flags, command=NODE, env=old_env(tree))  # rolled back
    assert "disk arena layout changed" not in again.log()
    expect_old_engine(old_engine(tree, {"socket": again.socket, "load": K2}), 8, "local_disk")


def test_a_release_two_versions_away_is_refused_by_every_side(tree, etcd, daemons):
    common = ["--etcd", etcd.endpoint, "--lease-ttl", "3", "--host-cache-mb", "2"]
    ahead = daemons("node-ahead", "127.0.0.4", *common, command=(*versioned_node.COMMAND, "4"))
    old = daemons("node-old", "127.0.0.2", *common, command=NODE, env=old_env(tree))
    new = daemons("node-new", "127.0.0.3", *common)

    # engines of either release on a node at 4: refused, both versions named
    with pytest.raises(NodeError, match="the engine speaks kvbm protocol 2, node node-ahead 4"):
        NodeAttachment(ahead.socket, GEOMETRY)
    refused = old_engine(tree, {"socket": ahead.socket})["error"]
    assert "the engine speaks kvbm protocol 1, node node-ahead 4" in refused
    # an engine of its own version stores a prompt there
    own = NodeAttachment(ahead.socket, GEOMETRY, versions=Compatibility(4))
    on_new = NodeAttachment(new.socket, GEOMETRY, remote=["host"])
    try:
        made = Engine(len(K3))
        assert own.store(made.kv, own.keys(K3), made.compute(own.keys(K3))) == 8
        # the new node sees it in the index, but does not pull from a node at
        # 4 (its record says so): the engine loads nothing, and recomputes
        ks = on_new.keys(K3)
        until(lambda: on_new.lookup(ks, ask_node=True).total == 8, 10, "new never saw K3")
        assert on_new.load(Engine(8).kv, ks, list(range(8)))[0] == 0
        reason = "peer node-ahead speaks kvbm protocol 4, node node-new 2"
        until(lambda: reason in new.log(), 5, "the new node did not say why")
        assert "peer=node-ahead reason=another protocol version" in new.log()  # left alone
        # the old node reads no version in records, so it connects: the node
        # at 4 refuses its hello, naming both, and the old engine recomputes
        order = {"socket": old.socket, "remote": ["host"], "load": K3}
        expect_old_engine(old_engine(tree, order), 0)
        reason = "peer node-old speaks kvbm protocol 1, node node-ahead 4"
        until(lambda: reason in ahead.log(), 5, "the node at 4 did not say why")
    finally:
        own.close()
        on_new.close()
