"""A node cut off by a network partition, as a failed switch or a firewall cuts
a machine off: node P runs in its own network namespace behind a veth pair, and
nftables drops everything on that veth. Nothing crashes, so only the lease can
tell the others: within the lease TTL P's blocks must vanish from the other
nodes' index mirrors (their engines stop counting on a peer that cannot answer,
and a load never hangs on it), while P keeps serving its own engine. When the
rule goes, P must take a new lease and republish, and the others must pull its
blocks again, bit-exact. Needs root (namespaces, nftables), as CI has."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from discovery.etcd_server import EtcdServer
from kvbm.connector.attach import Available, NodeAttachment
from kvbm.node_process import NODE_COMMAND, NodeProcess
from tests.harness.node_daemon import loads_exactly, until
from tests.harness.root import need_root
from tests.harness.support import GEOMETRY, Engine

# A /29 of the test's own: the root end of the veth holds etcd and observer O
# (.1) and observer Q (.3); P sits at .2 inside the namespace. The observers
# cannot listen on loopback aliases: a node binds its pulls to its listen
# address, and the kernel routes no 127.x source out of a veth.
ROOT_ADDR, OTHER_ADDR, NS_ADDR = "10.213.9.1", "10.213.9.3", "10.213.9.2"
LEASE_TTL_S = 2
TABLE = "kvbmpart"


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def netns() -> Iterator[tuple[str, str]]:
    """(namespace, its veth end): a namespace joined to the root one by a veth pair."""
    need_root("partitions a node with a network namespace and nftables")
    if shutil.which("nft") is None:
        pytest.fail("a partition needs nftables: scripts/test installs nft as root")
    tag = f"kvbmp{os.getpid() % 100000}"
    ns, root_end, ns_end = tag, f"{tag}r", f"{tag}n"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", root_end, "type", "veth", "peer", "name", ns_end)
        sh("ip", "link", "set", ns_end, "netns", ns)
        for addr in (ROOT_ADDR, OTHER_ADDR):
            sh("ip", "addr", "add", f"{addr}/29", "dev", root_end)
        sh("ip", "link", "set", root_end, "up")
        sh("ip", "-n", ns, "addr", "add", f"{NS_ADDR}/29", "dev", ns_end)
        sh("ip", "-n", ns, "link", "set", ns_end, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield ns, ns_end
    finally:
        # removing the namespace removes its veth end, and with it the pair
        subprocess.run(["ip", "netns", "del", ns], check=False)
        subprocess.run(["ip", "link", "del", root_end], check=False, capture_output=True)


def namespaced_node(ns: str, directory: str, name: str, host: str, *flags: str) -> NodeProcess:
    """A `kvbm node` started under `ip netns exec` (which execs it: the
    child's PID is the node's, so `stop()` signals the node itself)."""
    command = ("ip", "netns", "exec", ns, *NODE_COMMAND)
    return NodeProcess(directory, name, host, *flags, command=command)


@pytest.fixture
def mesh(netns, tmp_path) -> Iterator[Callable[[str, str], NodeAttachment]]:
    """mesh(name, address) -> an engine attached to a new `kvbm node` on that
    address (inside the namespace for NS_ADDR), all on one etcd at ROOT_ADDR.
    Engines are closed and nodes stopped after the test."""
    ns, _ = netns
    secret = tmp_path / "secret"  # the same on every node, as in a real fleet
    secret.write_text(secrets.token_hex(32))
    secret.chmod(0o600)
    nodes: list[NodeProcess] = []
    engines: list[NodeAttachment] = []
    with EtcdServer(host=ROOT_ADDR) as etcd:
        flags = ["--etcd", etcd.endpoint, "--lease-ttl", str(LEASE_TTL_S)]
        flags += ["--secret-file", str(secret), "--host-cache-mb", "2", "--log-level", "info"]
        flags += ["--peer-timeout-ms", "500", "--peer-backoff-s", "1"]

        def join(name: str, address: str) -> NodeAttachment:
            if address == NS_ADDR:
                nodes.append(namespaced_node(ns, str(tmp_path), name, address, *flags))
            else:
                nodes.append(NodeProcess(str(tmp_path), name, address, *flags))
            engines.append(NodeAttachment(nodes[-1].socket, GEOMETRY, remote=["host"]))
            return engines[-1]

        try:
            yield join
        finally:
            for engine in engines:
                with contextlib.suppress(Exception):  # the nodes must stop regardless
                    engine.close()
            for node in nodes:
                node.stop()


def partition(ns: str, dev: str) -> None:
    """Drop every packet in and out of `dev` inside `ns` (lo stays up), counted."""
    rules = f"""
    table inet {TABLE} {{
        chain in {{ type filter hook input priority filter; policy accept;
                    iifname "{dev}" counter drop; }}
        chain out {{ type filter hook output priority filter; policy accept;
                     oifname "{dev}" counter drop; }}
    }}
    """
    subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, text=True, check=True
    )


def dropped(ns: str) -> dict[str, int]:
    """Packets the partition's rules dropped, by chain."""
    listing = json.loads(sh("ip", "netns", "exec", ns, "nft", "-j", "list", "table", "inet", TABLE))
    out: dict[str, int] = {}
    for item in listing["nftables"]:
        if "rule" in item:
            rule = item["rule"]
            counter = next(e["counter"] for e in rule["expr"] if "counter" in e)
            out[rule["chain"]] = counter["packets"]
    return out


def heal(ns: str) -> None:
    sh("ip", "netns", "exec", ns, "nft", "delete", "table", "inet", TABLE)


def test_a_partitioned_node_expires_from_the_mirrors_and_rejoins_when_healed(netns, mesh):
    ns, dev = netns
    p, o, q = mesh("node-p", NS_ADDR), mesh("node-o", ROOT_ADDR), mesh("node-q", OTHER_ADDR)
    # P computes three prompts: `warm` proves the path before the cut, `held`
    # and `other` are cut off with P (O and Q each pull one after the heal)
    warm, held, other = (p.keys(list(range(n, n + 8))) for n in (100, 200, 300))
    made = Engine(24)
    assert p.store(made.kv, warm + held + other, made.compute(warm + held + other)) == 24
    cut_off = held + other
    until(
        lambda: all(x.lookup(warm + cut_off) == Available(0, 24) for x in (o, q)),
        15,
        "P's blocks never seen",
    )
    # O pulls `warm` from P over the veth: both ways work before the cut
    assert loads_exactly(o, warm, "remote_host")

    partition(ns, dev)
    cut = time.monotonic()
    # at once, well before the lease lapses, Q's mirror still shows P
    assert q.lookup(cut_off) == Available(0, 16)
    # a pull into a black hole costs one peer timeout, not a hang
    t0 = time.monotonic()
    assert o.load(Engine(8).kv, held, list(range(8)))[0] == 0
    assert time.monotonic() - t0 < 5

    def forgotten(engine: NodeAttachment) -> bool:
        """P's record and entries gone from the mirror (not merely P left alone)."""
        stats = engine.stats()
        gone = "node-p" not in stats["peers"] and "node-p" not in stats["avoided_peers"]
        return gone and engine.lookup(cut_off) == Available(0)

    until(lambda: forgotten(o) and forgotten(q), LEASE_TTL_S + 6, "P stayed in a mirror")
    assert time.monotonic() - cut < LEASE_TTL_S + 6
    # only P's entries went: O's copy of `warm` is still there for Q
    assert q.lookup(warm) == Available(0, 8)
    # nobody left to ask: a load misses at once
    t0 = time.monotonic()
    assert o.load(Engine(8).kv, held, list(range(8)))[0] == 0
    assert time.monotonic() - t0 < 1
    # local serving never stops: P's engine still gets its blocks
    assert p.lookup(cut_off) == Available(16)
    assert loads_exactly(p, held, "local_host")
    # the rules did the cutting, both ways
    counts = dropped(ns)
    assert counts["in"] > 0 and counts["out"] > 0, counts

    heal(ns)
    until(
        lambda: all(x.lookup(cut_off) == Available(0, 16) for x in (o, q)),
        20,
        "P never came back",
    )
    # Q never pulled from P: its first pull, on a new connection, is bit-exact
    assert loads_exactly(q, other, "remote_host")
    # O's pull timed out in the cut: O dropped that connection (a request
    # stuck in its socket would hold up later ones until TCP resends it), so
    # its first pull after the heal, on a new one, gets the blocks at once
    assert loads_exactly(o, held, "remote_host")
