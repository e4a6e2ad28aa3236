"""Two nodes as two processes on their own loopback addresses: a pull brings the
serving node's disk and host blocks bit-exact; a serving node killed with
SIGKILL costs the puller one timeout and no unverified block."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

from kvbm.connector.direct import onboard
from kvbm.host_pool import ARENA_PREFIX
from kvbm.peer_blocks import ManagerBlocks
from kvbm.shm_arena import SharedArena
from tests.harness.support import Engine, keys
from transport.nixl_agent import NixlAgent
from transport.peer_rpc import PeerClient, pull

SECRET = b"k" * 32
N = 32


def start_peer(tmp_path) -> tuple[subprocess.Popen, int, int, int]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.harness.transport_node",
            "127.0.0.2",
            str(tmp_path / "peer"),
            str(N),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    port, on_disk, in_host = (int(x) for x in proc.stdout.readline().split())
    return proc, port, on_disk, in_host


def test_pull_between_two_node_processes_on_loopback_aliases(make_manager, tmp_path):
    proc, port, on_disk, in_host = start_peer(tmp_path)
    try:
        assert on_disk > 0 and in_host > 0, "the peer should hold blocks in both tiers"
        b = make_manager(host_slots=2 * N)
        agent = NixlAgent("node-127.0.0.3", b.host.arena.array.ctypes.data, b.host.arena.size)
        ks = keys(0, N)

        async def scenario():
            client = PeerClient(agent, SECRET, [b.geometry.fingerprint])
            try:
                await client.connect("127.0.0.2", port, local_host="127.0.0.3")
                first = await pull(client, list(ks), ManagerBlocks(b), timeout=20)
                # the peer dies; the next pull fails within its timeout, with nothing registered
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
                t0 = time.monotonic()
                second = await pull(client, list(keys(500, 4)), ManagerBlocks(b), 2)
                return first, second, time.monotonic() - t0
            finally:
                await client.close()
                agent.close()

        first, second, took = asyncio.run(asyncio.wait_for(scenario(), 90))
        assert first == list(ks)
        eng = Engine(N)
        assert onboard(b, eng.kv, ks, list(range(N))) == N
        assert all(eng.holds(k, i) for i, k in enumerate(ks))
        assert second == [] and took < 10
        assert b.lookup(keys(500, 4)).num_blocks == 0
        b.host.table.check()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        # the killed peer could not remove its arena's name: do it for it
        SharedArena.sweep_stale(ARENA_PREFIX)
