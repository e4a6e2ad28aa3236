"""Issue 14, finding 8: the index believed anyone who could write to etcd.
Against two real `kvbm node` processes on one etcd: a writer without the
fleet's secret (1) registers a node of its own, pointing at a listener, and
says it holds a prompt; (2) says node B itself holds A's prompt (which would
turn B's remote hits off); (3) rewrites A's record to point at its listener.
B believes none of it: it never connects to the listener, still pulls A's
prompt bit-exact, and counts what it dropped in kvbm_index_rejected_total."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import urllib.request

import aetcd
import msgpack

from discovery.runs import RunRecord
from discovery.schema import node_path, run_path
from discovery.tier import Tier
from kvbm.connector.attach import Available
from tests.harness.node_daemon import until
from tests.harness.peer_attacks import two_nodes
from tests.harness.ports import free_port
from tests.harness.support import GEOMETRY, SPACE, Engine

BLOCKS = 16


def rejected(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.3:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith('kvbm_index_rejected_total{reason="signature"} '):
                return float(line.split()[-1])
    return 0.0


def record(node_id: str, address: str, port: int) -> bytes:
    """A node record as `NodeRecord.encode` writes it, but not signed."""
    fields = {"v": 1, "node_id": node_id, "address": address, "rpc_port": port}
    fields |= {"nixl_agent": f"kvbm-{node_id}", "fingerprints": [GEOMETRY.fingerprint]}
    return msgpack.packb(fields)


def test_an_etcd_writer_without_the_secret_cannot_steer_a_node(etcd, daemons, tmp_path):
    metrics = free_port("127.0.0.3")
    listener = socket.create_server(("127.0.0.4", 0))  # where a forger would steer B
    listener.settimeout(0.1)
    with (
        contextlib.closing(listener),
        two_nodes(
            etcd,
            daemons,
            tmp_path,
            BLOCKS,
            "--namespace",
            SPACE.namespace,
            b_flags=("--metrics-port", str(metrics)),
        ) as n,
    ):
        eng_b, ks = n.eng_b, n.keys
        theirs = n.eng_a.keys(list(range(1000, 1000 + BLOCKS)))  # a prompt nobody holds
        evil_port = listener.getsockname()[1]
        ns = SPACE.namespace

        async def forge() -> None:
            raw = aetcd.Client(host=etcd.host, port=etcd.client_port)
            await raw.connect()
            try:
                await raw.put(node_path(ns, "evil"), record("evil", "127.0.0.4", evil_port))
                run = RunRecord.of(theirs, [Tier.HOST] * len(theirs)).encode()
                await raw.put(run_path(ns, "evil", 0), run)
                mine = RunRecord.of(ks, [Tier.HOST] * BLOCKS).encode()
                # "B holds these itself": B would stop pulling them
                await raw.put(run_path(ns, "node-b", 0), mine)
                await raw.put(node_path(ns, "node-a"), record("node-a", "127.0.0.4", evil_port))
            finally:
                await raw.close()

        asyncio.run(forge())
        until(lambda: rejected(metrics) >= 4, 10, "B did not count the forgeries")
        # nothing forged counts: no remote hit for the forger's prompt ...
        assert eng_b.lookup(theirs) == Available(0)
        got = Engine(BLOCKS)
        assert eng_b.load(got.kv, theirs, list(range(BLOCKS)))[0] == 0
        # ... and A's prompt is still A's, pulled from A itself, bit-exact
        assert eng_b.lookup(ks) == Available(0, BLOCKS)
        loaded, sources = eng_b.load(got.kv, ks, list(range(BLOCKS)))
        assert loaded == BLOCKS and sources.get("remote_host") == BLOCKS, sources
        assert all(got.holds(k, i) for i, k in enumerate(ks))
        try:
            listener.accept()[0].close()
            raise AssertionError("B connected to the forger's listener")
        except TimeoutError:
            pass
        assert "not signed by the fleet" in n.b.log()
