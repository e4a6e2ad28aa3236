"""`kvbm bench transport`: pulls between two node processes on 127.0.0.2 (the
peer, serving) and 127.0.0.3 (this process), over the peer RPC and NIXL (UCX,
each node's agent in a process of its own, as `kvbm node` runs it),
beside memcpy, a plain TCP socket between two processes, the kernel's own
copy between two processes (process_vm_readv, what UCX's CMA transport does
under a READ on one host: from private memory, and from files in the arenas'
directory, as the host arenas are), and raw O_DIRECT reads on the same file
system; and the checksum a pull verifies with, on one core and on all.
A pull's two parts are also timed alone: the peer's pin (one round trip) and
the batched READ of the same blocks, unverified (`peer_read_gbps`): no pull
can beat their sum, and `peer_host_vs_pin_and_read` is how close it comes."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import multiprocessing
import os
import statistics
import tempfile
import time
from multiprocessing.connection import Connection

import numpy as np
import torch

from discovery.tier import Tier
from kvbm.admission import FrequencyFilter
from kvbm.bench.reference import (
    Memcpy,
    cma_gbps,
    gbps,
    interleaved,
    raw_disk_read_gbps,
    tcp_socket_gbps,
    verify_gbps,
    vm_read,
)
from kvbm.bench.tiers import BENCH_GEOMETRY
from kvbm.block_key import BlockKey, KeySpace
from kvbm.config import child_environment
from kvbm.connector.direct import offload
from kvbm.connector.engine_kv import EngineKV
from kvbm.disk_pool import PAGE, DiskPool
from kvbm.host_pool import HostPool
from kvbm.manager import BlockManager
from kvbm.peer_blocks import ManagerBlocks
from kvbm.shm_arena import SHM_DIR
from transport.agent import Agent
from transport.confined_agent import ConfinedAgent
from transport.peer_rpc import PeerClient, PeerServer, pull

SECRET = os.urandom(32)
PEER, LOCAL = "127.0.0.2", "127.0.0.3"
BATCH = 64
HOST_BLOCKS = 4 * BATCH + 256  # four 64-block pulls and one 256-block pull
DISK_BLOCKS = 3 * BATCH
SINGLE = 100
FRESH = 30_000  # first key of BATCH blocks stored after the peer summed the rest


def space() -> KeySpace:
    return KeySpace("bench", BENCH_GEOMETRY.fingerprint)


def _peer(directory: str, arena_dir: str, secret: bytes, conn: Connection) -> None:
    """The serving node: DISK_BLOCKS blocks only on disk, HOST_BLOCKS + SINGLE
    in host and summed (checksums taken, as a node's background upkeep leaves
    blocks stored a little while ago), BATCH fresh ones in host, unsummed."""

    async def serve() -> None:
        g = BENCH_GEOMETRY
        mgr = BlockManager(
            g,
            # the host set and a filler: storing them drains the (older) disk set
            # to G3, and staging the disk set later pushes out only the filler
            HostPool(
                g,
                (HOST_BLOCKS + SINGLE + DISK_BLOCKS + BATCH) * g.slot_bytes,
                directory=arena_dir,
            ),
            # room for what staging drains too, so no disk-only block is pushed out
            DiskPool(
                g,
                directory,
                PAGE + (2 * DISK_BLOCKS + 8) * (PAGE + g.slot_bytes),
                mac_key=os.urandom(32),
            ),
            FrequencyFilter(1),
        )
        kv = EngineKV(g, [torch.randn(64, *g.layer_shape) for _ in range(g.num_layers)])
        ks = space()

        def put(keys: list[BlockKey]) -> None:
            for i in range(0, len(keys), 64):
                chunk = keys[i : i + 64]
                offload(mgr, kv, list(range(len(chunk))), chunk)

        put(ks.keys(list(range(10_000, 10_000 + DISK_BLOCKS))))  # drained to disk below
        put(ks.keys(list(range(20_000, 20_000 + DISK_BLOCKS))))  # the filler
        put(ks.keys(list(range(HOST_BLOCKS + SINGLE))))
        while mgr.checksum_newest(64):
            pass
        # a node's background upkeep writes its coldest G2 blocks to disk ahead
        # of their eviction (kvbm/node/upkeep.py): staging the disk set then
        # evicts the filler without writing it
        while mgr.write_ahead(mgr.host.num_slots, 64):
            pass
        put(ks.keys(list(range(FRESH, FRESH + BATCH))))
        agent = _agent("bench-peer", mgr)
        server = PeerServer(ManagerBlocks(mgr), agent, secret, max_pins_per_peer=1024)
        port = await server.start(PEER, 0)
        disk_keys = ks.keys(list(range(10_000, 10_000 + DISK_BLOCKS)))
        on_disk = sum(t == Tier.DISK for t in mgr.lookup(disk_keys).tiers)
        conn.send((port, on_disk, agent.pid))
        while not await asyncio.to_thread(conn.poll, 0.2):
            pass
        await server.close()
        agent.close()
        mgr.close()

    asyncio.run(serve())


def run(arena_dir: str = SHM_DIR) -> dict:
    if not os.path.isdir(arena_dir):
        raise ValueError(f"--arena-dir {arena_dir} is not a directory")
    g = BENCH_GEOMETRY
    out: dict = {
        "bench": "transport",
        "date": datetime.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count()},
        "block_bytes": g.block_bytes,
        "peer": PEER,
        "local": LOCAL,
        "arena_dir": arena_dir,
    }
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="kvbm-bench-transport-") as d:
        parent, child = ctx.Pipe()
        peer = ctx.Process(target=_peer, args=(d, arena_dir, SECRET, child))
        peer.start()
        slots = HOST_BLOCKS + DISK_BLOCKS + SINGLE + BATCH + 8
        mgr = BlockManager(g, HostPool(g, slots * g.slot_bytes, directory=arena_dir))
        out["arena_huge_pages"] = mgr.host.arena.huge_page_bytes() > 0
        agent = _agent("bench-local", mgr)
        try:
            if not parent.poll(300):
                raise RuntimeError("the peer node never started")
            port, on_disk, peer_agent = parent.recv()
            if on_disk != DISK_BLOCKS:
                raise RuntimeError(f"the peer has {on_disk} of {DISK_BLOCKS} blocks on disk")
            out.update(asyncio.run(_pulls(mgr, agent, port, peer_agent)))
        finally:
            parent.send("stop")
            peer.join(30)
            if peer.is_alive():
                peer.kill()
            agent.close()
            mgr.close()
        nbytes = BATCH * g.block_bytes
        out["memcpy_gbps"] = gbps(nbytes, interleaved({"memcpy": Memcpy(nbytes)}, 5)["memcpy"])
        out["tcp_socket_gbps"] = tcp_socket_gbps(256 << 20, LOCAL)
        out["cma_gbps"] = cma_gbps(nbytes, g.block_bytes, None)
        out["disk_read_gbps"] = raw_disk_read_gbps(d, nbytes)
    out["verify_gbps_one_core"] = verify_gbps(1)
    out["verify_gbps_all_cores"] = verify_gbps(os.cpu_count() or 1)
    out["peer_host_vs_memcpy"] = round(out["peer_host_pull_gbps"] / out["memcpy_gbps"], 3)
    out["peer_host_vs_tcp"] = round(out["peer_host_pull_gbps"] / out["tcp_socket_gbps"], 3)
    if out["cma_arena_gbps"]:  # the copy a READ makes, of the same blocks, between the same arenas
        out["peer_host_vs_cma_arena"] = round(out["peer_host_pull_gbps"] / out["cma_arena_gbps"], 3)
    out["peer_disk_vs_disk"] = round(out["peer_disk_pull_gbps"] / out["disk_read_gbps"], 3)
    if out["cma_arena_gbps"]:  # the transport alone: what a pull could reach with free checks
        out["peer_read_vs_cma_arena"] = round(out["peer_read_gbps"] / out["cma_arena_gbps"], 3)
    return out


async def _parts(
    client: PeerClient, tiers: ManagerBlocks, keys: list[BlockKey], peer_agent: int
) -> tuple[float, float, float | None]:
    """A pull's two parts, alone (medians of 5): the peer's `pin` of `keys`
    (one round trip), and one batched READ of them into slots reserved here,
    neither verified nor registered (what the transport itself costs,
    without this node's checksums and bookkeeping); and, interleaved with
    the READ, the kernel's own copy of the same blocks between the same two
    arenas (process_vm_readv from the peer's agent process, `peer_agent`,
    where the READ reads them; None where the kernel refuses it)."""
    wire = [bytes(k) for k in keys]
    spare = [bytes(k) for k in space().keys(list(range(50_000, 50_000 + len(keys))))]
    mine = tiers.mgr.host.arena.array.ctypes.data  # this process's mapping of the arena
    size = tiers.block_bytes
    pins, reads, copies = [], [], []
    for rep in range(5):
        t0 = time.perf_counter()
        blocks = (await client.call("pin", {"keys": wire}, 10))["blocks"]
        pins.append(time.perf_counter() - t0)
        try:
            # checked as a pull checks a pin reply: these bytes are read and written
            there = np.array([off for _, off, _, _ in blocks], np.uint64)
            if [k for k, _, _, _ in blocks] != wire or any(n != size for _, _, n, _ in blocks):
                raise RuntimeError("the peer pinned other blocks than those asked")
            if there.max() > client.remote_arena_bytes - size:
                raise RuntimeError("the peer pinned a block outside its arena")
            spot = tiers.prepare_store(spare)  # slots here; never registered
            try:
                at = np.array([off for _, off in spot.entries], np.uint64)
                if len(at) != len(wire):
                    raise RuntimeError("no room here for the blocks")
                sizes = np.full(len(at), size, np.uint64)
                local = np.c_[client.agent.local_arena[0] + at, sizes]  # in our agent's process
                here = np.c_[mine + at, sizes]  # in this one
                remote = np.c_[client.remote_arena + there, sizes]
                kernel = vm_read(peer_agent, here, remote)
                for turn in (rep % 2, 1 - rep % 2):  # each goes first in turn
                    t0 = time.perf_counter()
                    if turn == 0:
                        if not await asyncio.to_thread(
                            client.agent.read, client.peer, local, remote, 10
                        ):
                            raise RuntimeError("the READ failed")
                        reads.append(time.perf_counter() - t0)
                    else:
                        with contextlib.suppress(OSError):
                            kernel()
                            copies.append(time.perf_counter() - t0)
            finally:
                tiers.complete_store(spot, None)
        finally:
            await client.call("unpin", {"keys": wire}, 10)
    copy = statistics.median(copies) if len(copies) == len(reads) else None
    return statistics.median(pins), statistics.median(reads), copy


async def _connects(agent: Agent, port: int, times: int = 7) -> tuple[float, float]:
    """Medians, seconds: a peer connection made (handshake, `auth`, the
    peer's NIXL metadata loaded) and a plain TCP connect to the same port,
    taken in turn."""
    peer_s, tcp_s = [], []
    for _ in range(times):
        client = PeerClient(agent, SECRET, [BENCH_GEOMETRY.fingerprint])
        t0 = time.perf_counter()
        await client.connect(PEER, port, local_host=LOCAL)
        peer_s.append(time.perf_counter() - t0)
        await client.close()
        t0 = time.perf_counter()
        _, writer = await asyncio.open_connection(PEER, port, local_addr=(LOCAL, 0))
        tcp_s.append(time.perf_counter() - t0)
        writer.close()
        await writer.wait_closed()
    return statistics.median(peer_s), statistics.median(tcp_s)


def _agent(name: str, mgr: BlockManager) -> ConfinedAgent:
    """As a node runs its agent: in a process of its own."""
    arena = mgr.host.arena
    return ConfinedAgent(name, arena.reopen(), arena.size, env=child_environment())


async def _pulls(mgr: BlockManager, agent: Agent, port: int, peer_agent: int) -> dict:
    g, ks, tiers = BENCH_GEOMETRY, space(), ManagerBlocks(mgr)
    client = PeerClient(agent, SECRET, [g.fingerprint])
    await client.connect(PEER, port, local_host=LOCAL)
    try:

        async def timed(keys: list[BlockKey], staged: bool = False) -> float:
            t0 = time.perf_counter()
            got = await pull(client, list(keys), tiers, 60, staged)
            seconds = time.perf_counter() - t0
            if len(got) != len(keys):
                raise RuntimeError(f"pulled {len(got)} of {len(keys)} blocks")
            return seconds

        await timed(ks.keys([HOST_BLOCKS + SINGLE - 1]))  # first contact: connection set-up
        host = [await timed(ks.keys(list(range(i * BATCH, (i + 1) * BATCH)))) for i in range(4)]
        big = await timed(ks.keys(list(range(4 * BATCH, 4 * BATCH + 256))))
        fresh = await timed(ks.keys(list(range(FRESH, FRESH + BATCH))))
        disk = [  # as a node pulls a run the peer holds on disk
            await timed(
                ks.keys(list(range(10_000 + i * BATCH, 10_000 + (i + 1) * BATCH))),
                staged=True,
            )
            for i in range(3)
        ]
        # single blocks the peer holds in G2, never pulled before
        single = [await timed(ks.keys([HOST_BLOCKS + i])) for i in range(SINGLE - 1)]
        single.sort()
        pin_s, read_s, copy_s = await _parts(client, tiers, ks.keys(list(range(BATCH))), peer_agent)
        host_s = statistics.median(host)
        out = {
            "cma_arena_gbps": copy_s and gbps(BATCH * g.block_bytes, copy_s),
            "peer_pin_ms": round(pin_s * 1e3, 3),
            "peer_read_gbps": gbps(BATCH * g.block_bytes, read_s),
            # what the pull adds to its two parts: the checksums, the bookkeeping
            "peer_host_vs_pin_and_read": round((pin_s + read_s) / host_s, 3),
            "peer_host_pull_gbps": gbps(BATCH * g.block_bytes, host_s),
            "peer_host_pull_256_gbps": gbps(256 * g.block_bytes, big),
            "peer_host_pull_unsummed_gbps": gbps(BATCH * g.block_bytes, fresh),
            "peer_disk_pull_gbps": gbps(BATCH * g.block_bytes, statistics.median(disk)),
            "single_block_pull_p50_ms": round(single[len(single) // 2] * 1e3, 3),
            "single_block_pull_p99_ms": round(single[int(len(single) * 0.99)] * 1e3, 3),
        }
    finally:
        await client.close()
    # what a peer pays to reconnect after its idle connection was closed: with
    # no other connection to the peer, so its metadata is loaded anew each time
    connect_s, tcp_connect_s = await _connects(agent, port)
    out["peer_connect_ms"] = round(connect_s * 1e3, 3)
    out["tcp_connect_ms"] = round(tcp_connect_s * 1e3, 3)
    out["peer_connect_vs_tcp_connect"] = round(connect_s / tcp_connect_s, 1)
    return out
