"""The NIXL agent wrapper with the real NIXL library and its UCX backend, between
two real processes: a batched READ lands bit-exact, and a dead peer costs one
timeout, never a hang."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import numpy as np

from transport.nixl_agent import NixlAgent

SIZE = 8 << 20
BLOCK = 256 << 10


def _serve(conn) -> None:
    """Child: a peer with an arena of known bytes, until told to go."""
    arena = np.frombuffer(np.random.default_rng(1).bytes(SIZE), dtype=np.uint8).copy()
    agent = NixlAgent("peer-a", arena.ctypes.data, arena.nbytes)
    conn.send((agent.metadata, arena.ctypes.data))
    while not conn.poll(0.001):
        agent.progress()  # what the node's RPC server loop does
    agent.close()


def test_a_batched_read_from_another_process_is_bit_exact():
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    peer = ctx.Process(target=_serve, args=(child,))
    peer.start()
    arena = np.zeros(SIZE, dtype=np.uint8)
    agent = NixlAgent("peer-b", arena.ctypes.data, arena.nbytes)
    try:
        assert parent.poll(60), "peer never started"
        metadata, remote_base = parent.recv()
        them = agent.add_peer(metadata)
        assert them.name == "peer-a"
        # blocks 3, 0, 17, 30 of the peer -> our slots 0, 1, 2, 3 (scattered both ways)
        src, dst = [3, 0, 17, 30], [0, 1, 2, 3]
        remote = np.array([(remote_base + b * BLOCK, BLOCK) for b in src], dtype=np.uint64)
        local = np.array([(arena.ctypes.data + s * BLOCK, BLOCK) for s in dst], dtype=np.uint64)
        assert agent.read(them, local, remote, timeout=10)
        expected = np.frombuffer(np.random.default_rng(1).bytes(SIZE), dtype=np.uint8)
        for s, b in zip(dst, src, strict=True):
            assert np.array_equal(
                arena[s * BLOCK : (s + 1) * BLOCK], expected[b * BLOCK : (b + 1) * BLOCK]
            )
        # untouched slots stay untouched
        assert not arena[4 * BLOCK :].any()

        # the peer dies -> the next read fails within its timeout, no hang
        os.kill(peer.pid, signal.SIGKILL)
        peer.join(10)
        t0 = time.monotonic()
        assert not agent.read(them, local, remote, timeout=3)
        assert time.monotonic() - t0 < 10
    finally:
        if peer.is_alive():
            parent.send("go")
            peer.join(10)
        if peer.is_alive():
            peer.kill()
        agent.close()
        agent.close()  # twice is fine
