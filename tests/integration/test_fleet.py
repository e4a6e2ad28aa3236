"""The fleet as `kvbm status` shows it, with real `kvbm node` processes and a
real etcd (issue 15): a node is in the index from its start, before any
engine; a second live node with an id already held refuses to start and
names the first one's address; a node SIGKILLed and restarted with its own
id within the lease TTL takes over: the old session's entries are gone at
once and what it holds now (its recovered disk blocks) is what the index
says, key by key."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from discovery.etcd_index import snapshot
from discovery.signing import IndexSigner
from discovery.tier import Tier
from kvbm.connector.attach import Available, NodeAttachment
from kvbm.errors import KvbmError
from tests.harness.node_daemon import TEST_FLEET_SECRET, kvbm_json, until
from tests.harness.ports import free_port
from tests.harness.support import GEOMETRY, SPACE, Engine


def fleet(etcd) -> dict[str, dict]:
    out = kvbm_json("status", "--etcd", etcd.endpoint, "--namespace", SPACE.namespace)
    return {n["node_id"]: n for n in out["nodes"]}


def test_nodes_are_listed_before_any_engine_and_a_duplicate_id_is_refused(etcd, daemons, tmp_path):
    common = ["--etcd", etcd.endpoint, "--namespace", SPACE.namespace]
    a = daemons("node-a", "127.0.0.2", *common)
    daemons("node-b", "127.0.0.3", *common)
    nodes = fleet(etcd)
    assert set(nodes) == {"node-a", "node-b"}
    assert nodes["node-a"]["peer_rpc"] == nodes["node-b"]["peer_rpc"] == "no engine yet"

    with pytest.raises(KvbmError, match=r"'node-a' is held by a live node at 127\.0\.0\.2"):
        daemons("node-a-again", "127.0.0.4", *common, "--node-id", "node-a")
    assert a.proc.poll() is None  # the first one serves on
    engine = NodeAttachment(a.socket, GEOMETRY)
    try:
        address = engine.stats()["peer_address"]
        until(lambda: fleet(etcd)["node-a"]["peer_rpc"] == address, 10, "record not updated")
    finally:
        engine.close()


def test_a_node_restarted_with_its_id_takes_over_at_once(etcd, daemons, tmp_path):
    ttl = 30  # the old session's keys would live 20-30 s after the kill
    flags = ["--etcd", etcd.endpoint, "--namespace", SPACE.namespace, "--lease-ttl", str(ttl)]
    flags += ["--host-cache-mb", "1", "--disk-admit-min-uses", "2"]
    flags += ["--disk-cache-dir", str(tmp_path / "disk"), "--disk-cache-mb", "4"]
    a = daemons("node-a", "127.0.0.2", *flags)
    engine = NodeAttachment(a.socket, GEOMETRY)
    # a prompt used twice (stored, loaded) earns a disk slot when it leaves G2;
    # the prompts after it, used once, fill G2 and live there only
    keys = engine.keys(list(range(8)))
    made = Engine(8)
    assert engine.store(made.kv, keys, made.compute(keys)) == 8
    assert engine.load(Engine(8).kv, keys, list(range(8)))[0] == 8
    once = engine.keys(list(range(100, 100 + engine.num_slots)))
    filler = Engine(len(once))
    assert engine.store(filler.kv, once, filler.compute(once)) == len(once)
    until(lambda: engine.stats()["tiers"]["disk"]["blocks"] >= 8, 10, "nothing reached disk")
    keys += once

    def published() -> dict[bytes, Tier]:
        mirror = asyncio.run(
            snapshot([etcd.endpoint], SPACE.namespace, IndexSigner(TEST_FLEET_SECRET.encode()))
        )
        return {k: h["node-a"] for k, h in mirror.locations.items() if "node-a" in h}

    until(lambda: len(published()) == len(keys), 10, "the old session never published")
    engine.close()
    os.kill(a.proc.pid, signal.SIGKILL)
    a.proc.wait(10)

    again = daemons("node-a-restarted", "127.0.0.2", *flags, "--node-id", "node-a")
    engine = NodeAttachment(again.socket, GEOMETRY)  # builds the tiers: the disk is recovered
    try:
        assert engine.stats()["tiers"]["host"]["blocks"] == 0  # host memory died with it
        held = {k for k in keys if engine.lookup([k]) == Available(1)}
        assert held
        truth = {k: Tier.DISK for k in held}

        until(lambda: truth.items() <= published().items(), 5, "recovered blocks unpublished")
        assert published() == truth  # and nothing of the old session (its host blocks)
        assert "taking over this node id" in again.log()
    finally:
        engine.close()


def test_healthz_says_503_until_the_node_is_ready_and_never_200_after_sigterm(daemons, tmp_path):
    """An "etcd" that accepts connections and never answers: the node's
    first attempt to join takes its timeout, and /healthz answers 503
    meanwhile; 200 once ready; after SIGTERM it never answers 200 again (503
    while stopping, then nothing)."""
    port = free_port("127.0.0.2")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    seen: list[int | None] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.2:{port}/healthz", timeout=1) as r:
                    seen.append(r.status)
            except urllib.error.HTTPError as e:
                seen.append(e.code)
            except OSError:
                seen.append(None)  # not listening
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        etcd = f"127.0.0.1:{silent.getsockname()[1]}"
        flags = ["--etcd", etcd, "--metrics-port", str(port)]
        node = daemons("node-a", "127.0.0.2", *flags)
        until(lambda: 200 in seen, 10, "never ready")
        up = [s for s in seen if s is not None]
        assert up[0] == 503 and up[-1] == 200, seen  # answered before it was ready
        mark = len(seen)
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(30) == 0
        time.sleep(0.2)
    finally:
        done.set()
        watcher.join(5)
        silent.close()
    assert 200 not in seen[mark + 1 :], seen[mark:]


def test_an_unsigned_record_under_a_nodes_id_does_not_keep_it_from_starting(
    etcd, daemons, tmp_path
):
    """An etcd writer without the secret puts a record under node-a's id and
    keeps its lease alive (as a live node would): node-a still starts (only
    a record the fleet signed counts as a live node of this id) and replaces
    it with its own. Believing any record would let an etcd writer keep every
    node of the fleet from starting."""
    from aetcd import Client

    from discovery.records import NodeRecord
    from discovery.schema import node_path

    stop = threading.Event()

    async def squat() -> None:
        raw = Client(host=etcd.host, port=etcd.client_port)
        await raw.connect()
        try:
            lease = await raw.lease(3)
            forged = NodeRecord("node-a", "127.0.0.9", 7450).encode()  # no signature
            await raw.put(node_path(SPACE.namespace, "node-a"), forged, lease=lease.id)
            while not stop.is_set():
                await raw.refresh_lease(lease.id)
                await asyncio.sleep(0.5)
        finally:
            await raw.close()

    squatter = threading.Thread(target=asyncio.run, args=(squat(),), daemon=True)
    squatter.start()
    try:
        time.sleep(1)
        flags = ["--etcd", etcd.endpoint, "--namespace", SPACE.namespace, "--lease-ttl", "3"]
        a = daemons("node-a", "127.0.0.2", *flags)
        assert a.proc.poll() is None
        nodes = fleet(etcd)
        assert set(nodes) == {"node-a"} and nodes["node-a"]["peer_rpc"] == "no engine yet"
    finally:
        stop.set()
        squatter.join(10)
