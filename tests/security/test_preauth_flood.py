"""Issue 14, finding 3: what a stranger's connections cost before they say a
valid hello. Against a real `kvbm node` with a secret: 300 idle connections
and 300 that announce a 1 MiB frame and send half of it, all held open from
one address, while an honest node pulls a prompt from it bit-exact; the
node's memory grows by less than 50 MB, and an idle connection is dropped
once the hello deadline has passed."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time

from kvbm.connector.attach import Available, NodeAttachment
from tests.node_daemon import until
from tests.security.peer_attacks import rss_mb, write_secret
from tests.support import GEOMETRY, Engine
from transport.peer_rpc import HELLO_TIMEOUT_S

ATTACKER = "127.0.0.4"
IDLE = HALF_SENT = 300
BLOCKS = 64


async def open_flood(host: str, port: int) -> list[asyncio.StreamWriter]:
    """IDLE silent connections and HALF_SENT with half of a 1 MiB frame each."""
    writers = []
    for i in range(IDLE + HALF_SENT):
        with contextlib.suppress(OSError):
            _, w = await asyncio.open_connection(host, port, local_addr=(ATTACKER, 0))
            writers.append(w)
            if i >= IDLE:
                w.write(struct.pack(">I", 1 << 20) + bytes(1 << 19))
                with contextlib.suppress(OSError):
                    await asyncio.wait_for(w.drain(), 1)
    return writers


def test_an_honest_peer_is_served_through_a_flood_of_strangers(etcd, daemons, tmp_path):
    secret = write_secret(tmp_path / "secret")
    common = ["--etcd", etcd.endpoint, "--secret-file", secret, "--host-cache-mb", "8"]
    a = daemons("node-a", "127.0.0.2", *common)
    b = daemons("node-b", "127.0.0.3", *common)
    eng_a = NodeAttachment(a.socket, GEOMETRY)
    eng_b = NodeAttachment(b.socket, GEOMETRY, remote=["host"])
    try:
        ks = eng_a.keys(list(range(BLOCKS)))
        made = Engine(BLOCKS)
        assert eng_a.store(made.kv, ks, made.compute(ks)) == BLOCKS
        host, port = eng_a.stats()["peer_address"].rsplit(":", 1)
        until(lambda: eng_b.lookup(ks) == Available(0, BLOCKS), 10, "B never saw A's blocks")
        rss_before = rss_mb(a.proc.pid)

        async def scenario() -> None:
            flood = await open_flood(host, int(port))
            try:
                # while the strangers hold their connections, B pulls the prompt
                got = Engine(BLOCKS)
                loaded, sources = await asyncio.to_thread(
                    eng_b.load, got.kv, ks, list(range(BLOCKS))
                )
                assert loaded == BLOCKS and sources.get("remote_host") == BLOCKS, sources
                assert all(got.holds(k, i) for i, k in enumerate(ks))
                assert rss_mb(a.proc.pid) - rss_before < 50
                # the node drops a silent stranger once the hello deadline has passed
                reader, _ = await asyncio.open_connection(host, int(port))
                t0 = time.monotonic()
                assert await asyncio.wait_for(reader.read(), HELLO_TIMEOUT_S + 5) == b""
                assert time.monotonic() - t0 >= HELLO_TIMEOUT_S - 0.5
            finally:
                for w in flood:
                    w.close()

        asyncio.run(asyncio.wait_for(scenario(), 120))
        log = a.log()
        assert "connections before hello" in log and "no hello within" in log
        assert eng_a.stats()["ready"]
    finally:
        eng_a.close()
        eng_b.close()
