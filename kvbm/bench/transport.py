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
import ctypes
import datetime
import multiprocessing
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

import numpy as np
import torch

from discovery.records import Tier
from kvbm.admission import FrequencyFilter
from kvbm.bench.direct import offload
from kvbm.bench.reference import Memcpy, RawDiskIO, gbps, interleaved
from kvbm.bench.tiers import BENCH_GEOMETRY
from kvbm.block_key import BlockKey, KeySpace
from kvbm.config import child_environment
from kvbm.connector.copy import EngineKV
from kvbm.disk_pool import IO_PIECE_BYTES, PAGE, DiskPool
from kvbm.hashing import checksum
from kvbm.host_pool import HostPool
from kvbm.manager import BlockManager
from kvbm.peer_tiers import ManagerTiers
from kvbm.shm_arena import SHM_DIR, SharedArena
from transport.agent import Agent
from transport.confined_agent import ConfinedAgent
from transport.peer_rpc import PeerClient, PeerServer, pull

SECRET = os.urandom(32)
PEER, LOCAL = "127.0.0.2", "127.0.0.3"
BATCH = 64
HOST_BLOCKS = 4 * BATCH + 256  # four 64-block pulls and one 256-block pull
DISK_BLOCKS = 3 * BATCH
SINGLE = 100
FRESH = 30_000  # first key of BATCH blocks stored after the peer sealed the rest


def space() -> KeySpace:
    return KeySpace("bench", BENCH_GEOMETRY.fingerprint)


def _peer(directory: str, arena_dir: str, secret: bytes, conn: Connection) -> None:
    """The serving node: DISK_BLOCKS blocks only on disk, HOST_BLOCKS + SINGLE
    in host and sealed (checksummed, as a node's background upkeep leaves
    blocks stored a little while ago), BATCH fresh ones in host, unsealed."""

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
        while mgr.seal_newest(64):
            pass
        # a node's background upkeep writes its coldest G2 blocks to disk ahead
        # of their eviction (kvbm/node/upkeep.py): staging the disk set then
        # evicts the filler without writing it
        while mgr.write_ahead(mgr.host.num_slots, 64):
            pass
        put(ks.keys(list(range(FRESH, FRESH + BATCH))))
        agent = _agent("bench-peer", mgr)
        server = PeerServer(ManagerTiers(mgr), agent, secret, max_pins_per_peer=1024)
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


def _tcp_sender(nbytes: int, port: int) -> None:
    data = os.urandom(4 << 20)
    with socket.create_connection((LOCAL, port)) as s:
        sent = 0
        while sent < nbytes:
            s.sendall(data[: min(len(data), nbytes - sent)])
            sent += min(len(data), nbytes - sent)


def tcp_socket_gbps(nbytes: int) -> float:
    """A plain TCP socket between two processes, loopback, 4 MiB sends."""
    with socket.socket() as srv:
        srv.bind((LOCAL, 0))
        srv.listen(1)
        proc = multiprocessing.get_context("spawn").Process(
            target=_tcp_sender, args=(nbytes, srv.getsockname()[1])
        )
        proc.start()
        conn, _ = srv.accept()
        buf = bytearray(4 << 20)
        view = memoryview(buf)
        got = 0
        t0 = time.perf_counter()
        with conn:
            while got < nbytes:
                n = conn.recv_into(view)
                if not n:
                    break
                got += n
        seconds = time.perf_counter() - t0
        proc.join(30)
    return gbps(got, seconds)


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _cma_holder(nbytes: int, arena_dir: str | None, conn: Connection) -> None:
    if arena_dir:  # a file mapping, as the host arena is
        arena = SharedArena.create(f"kvbm-bench-cma-{os.getpid()}", nbytes, directory=arena_dir)
        buf = arena.array
    else:  # private memory: large numpy buffers get transparent huge pages
        buf = np.empty(nbytes, np.uint8)
    buf[:] = np.frombuffer(os.urandom(nbytes), np.uint8)
    conn.send((os.getpid(), buf.ctypes.data))
    conn.recv()  # held until the reader is done
    if arena_dir:
        del buf
        arena.close()


def cma_gbps(nbytes: int, piece: int, arena_dir: str | None) -> float | None:
    """process_vm_readv of `nbytes` from another process, `piece` bytes per
    iovec (a block each), into a buffer of the same kind (private memory, or
    files in `arena_dir` like the host arenas): the kernel's own
    copy between two processes, what a one-sided READ does on one host. None
    where the kernel refuses it (ptrace rules)."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_cma_holder, args=(nbytes, arena_dir, child))
    proc.start()
    child.close()  # a holder that fails is then an EOFError here, not a hang
    local_arena = None
    if arena_dir:
        name = f"kvbm-bench-cma-{os.getpid()}"
        local_arena = SharedArena.create(name, nbytes, directory=arena_dir)
    try:
        pid, addr = parent.recv()
        dst = np.zeros(nbytes, np.uint8) if local_arena is None else local_arena.array
        starts = np.arange(nbytes // piece, dtype=np.uint64) * piece
        lengths = np.full(len(starts), piece, np.uint64)
        read = _vm_read(
            pid, np.c_[dst.ctypes.data + starts, lengths], np.c_[addr + starts, lengths]
        )
        try:
            return gbps(nbytes, interleaved({"cma": read}, 5)["cma"])
        except OSError:
            return None
    finally:
        with contextlib.suppress(OSError):  # the holder may be gone already
            parent.send("done")
        proc.join(30)
        if local_arena is not None:
            del dst
            local_arena.close()


def _vm_read(pid: int, local: np.ndarray, remote: np.ndarray) -> Callable[[], None]:
    """One process_vm_readv of rows (address, length) of process `pid` into
    rows (address, length) here; the call raises OSError where the kernel
    refuses it (ptrace rules)."""
    n, nbytes = len(local), int(local[:, 1].sum())
    here = (_IoVec * n)(*[_IoVec(int(a), int(b)) for a, b in local])
    there = (_IoVec * n)(*[_IoVec(int(a), int(b)) for a, b in remote])
    readv = ctypes.CDLL(None, use_errno=True).process_vm_readv

    def read() -> None:
        if readv(pid, here, n, there, n, 0) != nbytes:
            raise OSError(ctypes.get_errno(), "process_vm_readv")

    return read


def verify_gbps(threads: int, nbytes: int = 256 << 20, piece: int = 1 << 20) -> float:
    """Checksums (the xxh3 a pull verifies with) per second over `threads`
    threads started together, each over its own `nbytes` in `piece`-byte
    blocks: from memory, not cache (each buffer is larger than the L3 of a
    server). The checksum releases the GIL, so threads scale as cores do."""
    bufs = [np.frombuffer(os.urandom(nbytes), np.uint8) for _ in range(threads)]
    start = threading.Barrier(threads + 1)

    def run(buf: np.ndarray) -> None:
        view = memoryview(buf)
        start.wait()
        for i in range(0, nbytes, piece):
            checksum(view[i : i + piece])

    workers = [threading.Thread(target=run, args=(b,)) for b in bufs]
    for w in workers:
        w.start()
    start.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    return gbps(threads * nbytes, time.perf_counter() - t0)


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
        out["tcp_socket_gbps"] = tcp_socket_gbps(256 << 20)
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


def raw_disk_read_gbps(directory: str, nbytes: int) -> float:
    """O_DIRECT reads of `nbytes` in IO_PIECE_BYTES pieces, as the disk tier reads."""
    path = os.path.join(directory, "raw-reference.bin")
    buf = np.frombuffer(os.urandom(nbytes), dtype=np.uint8).copy()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_DIRECT", 0), 0o600)
    try:
        import mmap

        aligned = np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.uint8)
        aligned[:] = buf
        raw = RawDiskIO(fd, 0, aligned, aligned, IO_PIECE_BYTES)
        raw.write()
        return gbps(nbytes, interleaved({"read": raw.read}, 5)["read"])
    finally:
        os.close(fd)
        os.unlink(path)


async def _parts(
    client: PeerClient, tiers: ManagerTiers, keys: list[BlockKey], peer_agent: int
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
                kernel = _vm_read(peer_agent, here, remote)
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
    g, ks, tiers = BENCH_GEOMETRY, space(), ManagerTiers(mgr)
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
            "peer_host_pull_unsealed_gbps": gbps(BATCH * g.block_bytes, fresh),
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
