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

from tests.harness.peer_attacks import rss_mb, two_nodes
from tests.harness.support import Engine
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
    with two_nodes(etcd, daemons, tmp_path, BLOCKS, "--host-cache-mb", "8") as n:
        rss_before = rss_mb(n.a.proc.pid)

        async def scenario() -> None:
            flood = await open_flood(n.host, n.port)
            try:
                # while the strangers hold their connections, B pulls the prompt
                got = Engine(BLOCKS)
                loaded, sources = await asyncio.to_thread(
                    n.eng_b.load, got.kv, n.keys, list(range(BLOCKS))
                )
                assert loaded == BLOCKS and sources.get("remote_host") == BLOCKS, sources
                assert all(got.holds(k, i) for i, k in enumerate(n.keys))
                assert rss_mb(n.a.proc.pid) - rss_before < 50
                # the node drops a silent stranger once the hello deadline has passed
                reader, _ = await asyncio.open_connection(n.host, n.port)
                t0 = time.monotonic()
                assert await asyncio.wait_for(reader.read(), HELLO_TIMEOUT_S + 5) == b""
                assert time.monotonic() - t0 >= HELLO_TIMEOUT_S - 0.5
            finally:
                for w in flood:
                    w.close()

        asyncio.run(asyncio.wait_for(scenario(), 120))
        log = n.a.log()
        assert "connections before hello" in log and "no hello within" in log
        assert n.eng_a.stats()["ready"]
