"""Pulling blocks from a peer: pins, one batched NIXL READ per chunk, each
chunk verified and registered as it lands, rounds pipelined."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from transport.block_ports import BlockSink, PinnedBlock, Reservation
from transport.errors import TransportError
from transport.peer_rpc.client import PeerClient

log = logging.getLogger("transport.rpc")
ROUND_BYTES = 64 << 20  # per pin -> READ round; the next round's pin overlaps this one's READ
# From a peer's disk: smaller rounds, the first smallest, so that reading a
# round overlaps the peer's staging of the next, and the first READ waits less.
STAGED_ROUND_BYTES = 16 << 20
STAGED_FIRST_ROUND_BYTES = 4 << 20
MAX_ROUND_BLOCKS = 64  # however small the blocks
CHUNK_BYTES = 8 << 20  # per READ in a round: verified while the next is copied, still in cache


def round_blocks(block_bytes: int, nbytes: int = ROUND_BYTES) -> int:
    """Blocks in a round of about `nbytes`: at least one, at most MAX_ROUND_BLOCKS."""
    return max(1, min(MAX_ROUND_BLOCKS, nbytes // block_bytes))


async def pull(
    client: PeerClient,
    keys: list[bytes],
    sink: BlockSink,
    timeout: float = 5.0,
    staged: bool = False,
    round_bytes: int | None = None,
) -> list[bytes]:
    """Copy the longest prefix of `keys` the peer holds into this node's tiers.

    Works in rounds, pipelined: while round k is read the peer already pins
    and checksums round k+1. A round is read in chunks of CHUNK_BYTES (one
    batched NIXL READ each), and each chunk is verified and registered as
    soon as it lands, while the next chunk is being copied: its bytes are
    still in the cache, and the checksum costs no pass over memory of its
    own. Each round is unpinned as soon as its blocks are settled. Where the
    peer stages the blocks from its disk first (`staged`), rounds are
    smaller and the first smallest, so the first READ, and the pipeline,
    start sooner. `round_bytes` overrides the round size (tests).

    Returns the prefix of `keys` now held here (pulled and verified, or held
    already: those are not read again). Any failure (peer gone, timeout,
    checksum mismatch, peer evicted a block) makes those keys "not found":
    never a partial or unverified block, never a wait beyond `timeout`.
    """
    deadline = time.monotonic() + timeout
    here: list[bytes] = []
    pos = 0
    size = sink.block_bytes
    step = round_blocks(size, round_bytes or (STAGED_ROUND_BYTES if staged else ROUND_BYTES))
    asked = min(step, round_blocks(size, STAGED_FIRST_ROUND_BYTES)) if staged else step
    pinning: asyncio.Task | None = asyncio.create_task(_pin(client, keys[:asked], size, deadline))
    overlapped = False  # the pin in flight was asked while a round of ours was pinned
    try:
        while pinning is not None:
            blocks = await pinning
            pinning = None
            if not blocks and overlapped and time.monotonic() < deadline:
                # the peer's pin cap, full of our last round: ask again, now it is released
                overlapped = False
                pinning = asyncio.create_task(_pin(client, keys[pos : pos + asked], size, deadline))
                continue
            if not blocks:
                break
            full = len(blocks) == min(asked, len(keys) - pos)
            pos += len(blocks)
            asked = step
            more = pos < len(keys) and time.monotonic() < deadline
            overlapped = more and full
            if overlapped:  # pin the next round while this one is read
                pinning = asyncio.create_task(_pin(client, keys[pos : pos + asked], size, deadline))
            # in a thread even when small: the loop may be serving reads of its own
            got = await asyncio.to_thread(_read_round, client, blocks, sink, deadline)
            client.call_later("unpin", {"keys": [b.key for b in blocks]}, 2.0)
            here += got
            if len(got) < len(blocks):
                break  # a failed READ or block, or no room here: the prefix ends here
            if more and pinning is None:  # the peer pinned fewer: ask again once these are free
                pinning = asyncio.create_task(_pin(client, keys[pos : pos + asked], size, deadline))
    finally:
        if pinning is not None:  # a round pinned but never read: give its pins back
            leftover = await pinning
            if leftover:
                client.call_later("unpin", {"keys": [b.key for b in leftover]}, 2.0)
    return here


async def _pin(
    client: PeerClient, keys: list[bytes], block_bytes: int, deadline: float
) -> list[PinnedBlock]:
    """The peer's pins on the longest held prefix of `keys`; [] on any failure.
    Nothing the peer says is used before it is checked: each block is one of
    the keys asked for, in order, `block_bytes` long, inside the peer's arena."""
    try:
        reply = await client.call("pin", {"keys": keys}, max(0.01, deadline - time.monotonic()))
        blocks = [PinnedBlock(k, o, n, c) for k, o, n, c in reply["blocks"]]
    except (TimeoutError, TransportError, OSError, KeyError, TypeError, ValueError) as e:
        log.info("pull failed at pin peer=%s error=%r", client.peer, e)
        return []
    why = _bad_pins(blocks, keys, block_bytes, client.remote_arena_bytes)
    if why:
        log.warning("peer's pins refused peer=%s reason=%s", client.peer, why)
        client.call_later(
            "unpin", {"keys": [b.key for b in blocks if isinstance(b.key, bytes)]}, 2.0
        )
        return []
    return blocks


def _bad_pins(
    blocks: list[PinnedBlock], keys: list[bytes], block_bytes: int, arena_bytes: int
) -> str | None:
    """Why a pin reply cannot be read from, or None: a wrong length or offset
    would have the READ write past the slot reserved for a block here."""
    if [b.key for b in blocks] != keys[: len(blocks)]:
        return "keys it was not asked for"
    for b in blocks:
        if not all(type(v) is int for v in (b.offset, b.length, b.checksum)):
            return "a number that is not an integer"
        if b.length != block_bytes:
            return f"a block of {b.length} bytes, not {block_bytes}"
        if not 0 <= b.offset <= arena_bytes - block_bytes:
            return f"offset {b.offset} outside its {arena_bytes}-byte arena"
        if not 0 <= b.checksum < 2**64:
            return "a checksum out of range"
    return None


def _read_round(
    client: PeerClient, blocks: list[PinnedBlock], sink: BlockSink, deadline: float
) -> list[bytes]:
    """In a worker thread: reserve local slots for the round's blocks not held
    here, READ them chunk by chunk, and verify and register each chunk as it
    lands. Returns the round's keys now held here, in order, up to the first
    that is not. Every reservation is settled before it returns."""
    per = max(1, CHUNK_BYTES // sink.block_bytes)
    pieces = [blocks[i : i + per] for i in range(0, len(blocks), per)]
    reservations: list[Reservation] = []
    for piece in pieces:
        reservations.append(sink.prepare_store([b.key for b in piece]))
        if len(reservations[-1].entries) + len(reservations[-1].held) < len(piece):
            break  # no room here for the rest
    pinned = {b.key: b for b in blocks}
    reading = [r for r in reservations if r.entries]
    settled: set[int] = set()  # indices into `reading`
    here: set[bytes] = set()

    def landed(i: int) -> bool:
        r = reading[i]
        settled.add(i)
        got = sink.complete_store(r, [pinned[k].checksum for k, _ in r.entries])
        here.update(got)
        return len(got) == len(r.entries)

    try:
        base, peer_base = client.agent.local_arena[0], client.remote_arena
        chunks = [
            (
                np.array([(base + off, pinned[k].length) for k, off in r.entries], np.uint64),
                np.array(
                    [(peer_base + pinned[k].offset, pinned[k].length) for k, _ in r.entries],
                    np.uint64,
                ),
            )
            for r in reading
        ]
        left = max(0.0, deadline - time.monotonic())
        client.agent.read_chunks(client.peer, chunks, left, landed)
    finally:
        for i, r in enumerate(reading):
            if i not in settled:
                sink.complete_store(r, None)  # frees the slots
    out: list[bytes] = []
    for r, piece in zip(reservations, pieces, strict=False):
        for b in piece:
            if b.key not in here and b.key not in r.held:
                return out  # nothing past a block that is not here counts
            out.append(b.key)
    return out
