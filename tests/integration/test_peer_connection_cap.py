"""A node's cap on connected peers (`max_peer_connections`), against real
nodes: at the cap a new peer takes the place of the connection idle longest,
whose peer reconnects when it next calls; connections in use are never
taken, so a new peer is refused while every one of them is busy or fresh."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from tests.harness.node_daemon import loads_exactly
from tests.harness.peer_attacks import raw_session, two_nodes
from transport.peer_rpc import IDLE_CLOSE_S

BLOCKS = 16


async def hung_up(reader: asyncio.StreamReader) -> bool:
    """Whether the node has closed this connection (read at once)."""
    try:
        return await asyncio.wait_for(reader.read(1), 0.5) == b""
    except TimeoutError:
        return False


def test_a_new_peer_takes_the_place_of_the_idlest_connection(etcd, daemons, tmp_path):
    cap = ("--max-peer-connections", "2")
    # B leaves no peer alone after a failed pull: its next load asks A again
    with two_nodes(etcd, daemons, tmp_path, BLOCKS, *cap, b_flags=("--peer-backoff-s", "0")) as n:

        async def scenario() -> None:
            older = await raw_session(n.host, n.port)  # two peers fill A's cap
            await asyncio.sleep(0.5)
            newer = await raw_session(n.host, n.port)
            try:
                await replaced(older[0], newer[0])
            finally:
                older[1].close()
                newer[1].close()

        async def replaced(older: asyncio.StreamReader, newer: asyncio.StreamReader) -> None:
            # both fresh: B is refused and its engine recomputes
            assert not await asyncio.to_thread(loads_exactly, n.eng_b, n.keys, "remote_host")
            assert n.eng_a.stats()["peer_connections"] == {"open": 2, "closed_idle": 0}
            # once they have been quiet long enough, B takes the idler one's place
            await asyncio.sleep(IDLE_CLOSE_S - 0.5)
            assert await asyncio.to_thread(loads_exactly, n.eng_b, n.keys, "remote_host")
            assert await hung_up(older)
            assert not await hung_up(newer)
            assert n.eng_a.stats()["peer_connections"] == {"open": 2, "closed_idle": 1}

        asyncio.run(asyncio.wait_for(scenario(), 60))
        log = n.a.log()
        assert "more than 2 peer connections" in log
        assert "closing an idle peer connection for a new one peer=attacker" in log


def test_the_node_raises_its_open_file_limit_to_fit_its_peers():
    # in a child: the limits are the process's own
    script = """
import resource
from kvbm.node.file_limit import FILES_BESIDES_PEERS, fit_file_limit
hard = min(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # lowering is always allowed
want = 200 + FILES_BESIDES_PEERS
assert fit_file_limit(100) == min(want, hard)
assert resource.getrlimit(resource.RLIMIT_NOFILE) == (min(want, hard), hard)
assert fit_file_limit(5000) == hard  # as far as the hard limit allows, with a warning
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "raise the hard limit" in out.stderr
