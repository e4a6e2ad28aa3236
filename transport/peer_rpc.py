"""The peer control RPC over asyncio TCP, in authenticated frames (frames.py).

Calls: `hello` (NIXL metadata, arena base address and layout fingerprints, both
ways; a peer without a common fingerprint is refused), `pin` (the longest held
prefix of some keys, pinned, with arena offsets and checksums) and `unpin`.
Pins expire after `pin_ttl` seconds, so a requester that dies never leaks
them, and a peer may hold at most `max_pins_per_peer` at once. A connection
that sends anything malformed is closed with a logged reason; the server goes
on serving its other peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Iterable

import numpy as np

from transport.errors import ProtocolError, TransportError
from transport.frames import FrameCodec, Message
from transport.nixl_agent import NixlAgent
from transport.tiers import BlockSink, BlockSource, PinnedBlock

log = logging.getLogger("transport.rpc")
CALLS = ("hello", "pin", "unpin", "ok", "error")
MAX_KEYS_PER_CALL = 4096


class PeerServer:
    """Invariant: `pins[peer]` maps each key a peer holds pinned to its expiry;
    the reaper unpins whatever has expired, so every pin ends."""

    def __init__(
        self,
        source: BlockSource,
        agent: NixlAgent,
        secret: bytes,
        pin_ttl: float = 10.0,
        max_pins_per_peer: int = 4096,
    ) -> None:
        self.source = source
        self.agent = agent
        self.codec = FrameCodec(secret, CALLS)
        self.pin_ttl = pin_ttl
        self.max_pins_per_peer = max_pins_per_peer
        self.pins: dict[str, dict[bytes, float]] = {}
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task] = []

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._serve, host, port)
        self._tasks = [asyncio.create_task(self._progress()), asyncio.create_task(self._reaper())]
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for peer in list(self.pins):
            self._release(peer, list(self.pins[peer]))

    async def _progress(self) -> None:
        while True:  # with NIXL's progress thread off, this drives peers' reads
            self.agent.progress()
            await asyncio.sleep(0.0005)

    async def _reaper(self) -> None:
        while True:
            await asyncio.sleep(self.pin_ttl / 4)
            now = time.monotonic()
            for peer, held in list(self.pins.items()):
                expired = [k for k, t in held.items() if t < now]
                if expired:
                    log.info("pins expired peer=%s blocks=%d", peer, len(expired))
                    self._release(peer, expired)

    def _release(self, peer: str, keys: Iterable[bytes]) -> None:
        held = self.pins.get(peer, {})
        mine = [k for k in keys if held.pop(k, None) is not None]
        if mine:
            self.source.unpin_for_peer(peer, mine)
        if not held:
            self.pins.pop(peer, None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        addr = writer.get_extra_info("peername")
        peer = None
        try:
            while True:
                msg = await self.codec.read(reader)
                if peer is None and msg.call != "hello":
                    raise ProtocolError("first call must be hello")
                if msg.call == "hello":
                    peer, reply = self._hello(msg)
                elif msg.call == "pin":
                    reply = await self._pin(peer, msg)
                elif msg.call == "unpin":
                    self._release(peer, _keys(msg))
                    reply = {}
                else:
                    raise ProtocolError(f"{msg.call!r} is not a request")
                writer.write(self.codec.encode(Message("ok", msg.id, reply)))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass  # the peer hung up
        except (ProtocolError, TransportError) as e:
            log.warning("closing peer connection addr=%s reason=%s", addr, e)
        except ConnectionError:
            pass
        except Exception as e:  # a request the tiers refused (a bad key, say): this peer only
            log.warning("closing peer connection addr=%s reason=%r", addr, e)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _hello(self, msg: Message) -> tuple[str, dict]:
        body = msg.body
        fingerprints = body.get("fingerprints")
        metadata = body.get("nixl")
        if (
            not isinstance(fingerprints, list)
            or not all(type(f) is int for f in fingerprints)
            or not isinstance(metadata, bytes)
        ):
            raise ProtocolError("bad hello")
        if not set(fingerprints) & self.source.fingerprints:
            raise ProtocolError("no layout fingerprint in common: the nodes cannot share blocks")
        peer = self.agent.add_peer(metadata)
        return peer, {
            "nixl": self.agent.metadata,
            "arena": self.agent.arena[0],
            "fingerprints": sorted(self.source.fingerprints),
        }

    async def _pin(self, peer: str, msg: Message) -> dict:
        keys = _keys(msg)
        held = self.pins.setdefault(peer, {})
        keys = keys[: max(0, self.max_pins_per_peer - len(held))]
        blocks = await asyncio.to_thread(self.source.pin_for_peer, peer, keys) if keys else []
        expiry = time.monotonic() + self.pin_ttl
        for b in blocks:
            held[b.key] = expiry
        return {"blocks": [[b.key, b.offset, b.length, b.checksum] for b in blocks]}


def _keys(msg: Message) -> list[bytes]:
    keys = msg.body.get("keys")
    if not isinstance(keys, list) or len(keys) > MAX_KEYS_PER_CALL:
        raise ProtocolError("bad key list")
    if not all(isinstance(k, bytes) and 0 < len(k) <= 256 for k in keys):
        raise ProtocolError("bad key")
    return keys


class PeerClient:
    """One connection to one peer; calls are serialised on it."""

    def __init__(self, agent: NixlAgent, secret: bytes, fingerprints: Iterable[int]) -> None:
        self.agent = agent
        self.codec = FrameCodec(secret, CALLS)
        self.fingerprints = sorted(fingerprints)
        self.peer: str | None = None
        self.remote_arena = 0
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(
        self, host: str, port: int, timeout: float = 5.0, local_host: str | None = None
    ) -> None:
        """Connect and say hello; `local_host` binds this side (a node's own address)."""
        local = (local_host, 0) if local_host else None
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, local_addr=local), timeout
        )
        reply = await self.call(
            "hello", {"nixl": self.agent.metadata, "fingerprints": self.fingerprints}, timeout
        )
        self.peer = self.agent.add_peer(reply["nixl"])
        self.remote_arena = int(reply["arena"])

    async def call(self, name: str, body: dict, timeout: float) -> dict:
        if self._writer is None or self._reader is None:
            raise TransportError("not connected")
        async with self._lock:
            msg_id = next(self._ids)
            try:
                self._writer.write(self.codec.encode(Message(name, msg_id, body)))
                await self._writer.drain()
                reply = await asyncio.wait_for(self.codec.read(self._reader), timeout)
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                raise TransportError(f"peer closed the connection during {name}") from e
        if reply.id != msg_id or reply.call != "ok":
            raise TransportError(f"peer refused {name}: {reply.body}")
        return reply.body

    async def close(self) -> None:
        if self.peer is not None:
            self.agent.remove_peer(self.peer)
            self.peer = None
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
            self._writer = None


async def pull(
    client: PeerClient, keys: list[bytes], sink: BlockSink, timeout: float = 5.0
) -> list[bytes]:
    """Copy the longest prefix of `keys` the peer holds into this node's tiers,
    in rounds of what the peer pins at once.

    Returns the prefix of `keys` now held here (pulled and verified, or held
    already: those are not read again). Any failure (peer gone, timeout,
    checksum mismatch, peer evicted a block) makes those keys "not found":
    never a partial or unverified block, never a wait beyond `timeout`.
    """
    deadline = time.monotonic() + timeout
    arrived: list[bytes] = []
    while len(arrived) < len(keys) and time.monotonic() < deadline:
        rest = keys[len(arrived) :]
        got, pinned = await _pull_round(client, rest, sink, deadline)
        arrived += got
        if not pinned or len(got) < pinned or got != rest[: len(got)]:
            break  # the peer has no more of the prefix, or something failed
    return arrived


async def _pull_round(
    client: PeerClient, keys: list[bytes], sink: BlockSink, deadline: float
) -> tuple[list[bytes], int]:
    """One pin -> READ -> verify -> unpin. Returns (the prefix of the pinned keys
    now held here, blocks pinned)."""
    try:
        reply = await client.call("pin", {"keys": keys}, max(0.01, deadline - time.monotonic()))
        blocks = [PinnedBlock(bytes(k), int(o), int(n), int(c)) for k, o, n, c in reply["blocks"]]
    except (TimeoutError, TransportError, OSError, KeyError, TypeError, ValueError) as e:
        log.info("pull failed at pin peer=%s error=%r", client.peer, e)
        return [], 0
    arrived: list[bytes] = []
    entries: list[tuple[bytes, int]] = []
    try:
        wanted = {b.key: b for b in blocks}
        reservation = sink.reserve([b.key for b in blocks])
        entries = reservation.entries
        if entries:
            base, peer_base = client.agent.arena[0], client.remote_arena
            local = np.array([(base + off, wanted[k].length) for k, off in entries], np.uint64)
            remote = np.array(
                [(peer_base + wanted[k].offset, wanted[k].length) for k, _ in entries], np.uint64
            )
            left = max(0.0, deadline - time.monotonic())
            ok = await asyncio.to_thread(client.agent.read, client.peer, local, remote, left)
            sums = [wanted[k].checksum for k, _ in entries] if ok else None
            arrived = sink.commit(reservation, sums)
    finally:
        with contextlib.suppress(Exception):
            unpin = {"keys": [b.key for b in blocks]}
            await client.call("unpin", unpin, max(0.5, deadline - time.monotonic()))
    # What is here now, from the front: pulled and verified, or held already.
    landed, reserved = set(arrived), {k for k, _ in entries}
    here = []
    for b in blocks:
        if b.key in reserved and b.key not in landed:
            break
        here.append(b.key)
    return here, len(blocks)
