"""The peer control RPC over asyncio TCP, in authenticated frames (frames.py).

A connection opens with a handshake: `hello` (signed: the client's fresh
nonce, its node id and layout fingerprints; a peer without a common
fingerprint is refused) is answered with the server's nonce, node id and
proof of the secret; from then on every frame is sealed under this
connection's keys, and `auth` (sealed, empty) is answered with the server's
NIXL metadata, arena base and size. Only the client loads the other's
metadata: READs need the target's, never the initiator's, so a server
parses no peer's NIXL metadata and learns none of its clients'. A peer is
the node id of its hello (its pins and caps are that node's). Then `pin`
(the longest held prefix of some keys, pinned, with arena offsets and
checksums) and `unpin`; and, where the node owns shards of a sharded index
(discovery/sharded.py), `place` (which of the owner's keys the peer holds)
and `locate` (who holds some keys). Pins expire after `pin_ttl` seconds, so a requester
that dies never leaks them; a peer may hold at most `max_pins_per_peer` at
once and all peers together `max_pins_total`, so no peer can take the arena
from the node's own engines. A connection that sends anything malformed (a
second hello included) is closed with a logged reason; the server goes on
serving its other peers. At most `max_connections` peers are connected at
once; a peer that connects beyond that takes the place of the connection
idle longest (no call for IDLE_CLOSE_S, no pins held), so in a fleet larger
than the cap a node's idle peers reconnect when they next call instead of
new ones being refused. Before both sides have proved the secret a
connection holds a place at the gate of preauth.py: a few per source
address, MAX_UNAUTHENTICATED from all addresses together.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from transport.agent import Agent, Peer
from transport.errors import AuthError, ProtocolError, TransportError
from transport.frames import (
    HANDSHAKE_NONCE_BYTES,
    FrameCodec,
    Message,
    SessionCodec,
    server_proof,
    session_keys,
)
from transport.preauth import Gate, deepen_backlog, quiet_accept_errors
from transport.tiers import BlockSink, BlockSource, LocationOwner, PinnedBlock, Reservation

log = logging.getLogger("transport.rpc")
CALLS = ("hello", "auth", "pin", "unpin", "place", "locate", "ok", "error")
MAX_KEYS_PER_CALL = 4096
MAX_HOLDERS = 64  # per key, in a `locate` answer (a frame's map holds no more)
MAX_CONNECTIONS = 1024  # peers that said a valid hello (a fleet of about that many nodes)
IDLE_CLOSE_S = 5.0  # a connection quiet this long may give its place to a new peer
HUNG_UP = "peer closed the connection"
# Before a valid hello a connection costs the node little and not for long:
MAX_UNAUTHENTICATED_PER_ADDRESS = 16
MAX_UNAUTHENTICATED = 256  # from all addresses (the node's descriptors: daemon.fit_file_limit)
HELLO_TIMEOUT_S = 5.0  # from accept to a valid hello
PRE_AUTH_MAX_FRAME = 64 << 10  # a hello is a nonce, a node id and a few fingerprints
FRAME_TIMEOUT_S = 10.0  # from a frame's length to its last byte
NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass
class _Pin:
    block: PinnedBlock
    expiry: float  # monotonic


@dataclass
class _Connection:
    peer: str
    idle_since: float | None = None  # monotonic; None while a call is served


class PeerServer:
    """Invariant: `pins[peer]` maps each key a peer holds pinned to the one
    pin the source granted for it (a key pinned again is handed back at
    once) and its expiry; the reaper unpins whatever has expired, so every
    pin ends, and each goes back to the source exactly once. This table is
    the only record of peers' pins."""

    def __init__(
        self,
        source: BlockSource,
        agent: Agent,
        secret: bytes,
        pin_ttl: float = 10.0,
        max_pins_per_peer: int = 4096,
        max_pins_total: int = 8192,
        node_id: str | None = None,
        owner: LocationOwner | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        """`node_id`: this node, as its clients are told (default: the agent's name).
        `owner`: the node's shards of a sharded index (None: `place` and
        `locate` are refused)."""
        self.source = source
        self.owner = owner
        self.agent = agent
        self.node_id = node_id or agent.name
        self.secret = secret
        self.codec = FrameCodec(secret, CALLS)  # hellos: one codec, so one nonce memory
        self.pin_ttl = pin_ttl
        self.max_pins_per_peer = max_pins_per_peer
        self.max_pins_total = max_pins_total
        self.max_connections = max_connections
        self.connections = 0  # authenticated ones
        self.closed_idle = 0  # connections closed to make room for a new peer
        self._open: dict[asyncio.Task, _Connection] = {}  # authenticated, by handler
        self.preauth = Gate(
            MAX_UNAUTHENTICATED, MAX_UNAUTHENTICATED_PER_ADDRESS, "connections before hello", log
        )
        self.pins: dict[str, dict[bytes, _Pin]] = {}
        self._asking: dict[str, int] = {}  # peer -> keys its pins in flight may pin
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task] = []
        self._handlers: set[asyncio.Task] = set()  # one per open connection

    async def start(self, host: str, port: int) -> int:
        quiet_accept_errors()
        self._server = await asyncio.start_server(self._serve, host, port)
        deepen_backlog(self._server)
        self._tasks = [asyncio.create_task(self._reaper())]
        if not self.agent.drives_itself:
            self._tasks.append(asyncio.create_task(self._progress()))
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
        for t in self._handlers:
            t.cancel()
        if self._handlers:
            await asyncio.wait(list(self._handlers))
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
                expired = [k for k, pin in held.items() if pin.expiry < now]
                if expired:
                    log.info("pins expired peer=%s blocks=%d", peer, len(expired))
                    self._release(peer, expired)

    @property
    def pinned_count(self) -> int:
        return sum(len(held) for held in self.pins.values())

    def _release(self, peer: str, keys: Iterable[bytes]) -> None:
        held = self.pins.get(peer, {})
        mine = [pin.block for pin in (held.pop(k, None) for k in keys) if pin is not None]
        if mine:
            self.source.complete_read(mine)
        if not held:
            self.pins.pop(peer, None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        addr = writer.get_extra_info("peername")
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        ticket = self.preauth.admit(str(addr[0]) if isinstance(addr, tuple) else "?", handler)
        authenticated = False
        try:
            if ticket is None:  # its address holds its share already (logged by the gate)
                return
            try:
                handshake = self._handshake(reader, writer)
                session, msg, node = await asyncio.wait_for(handshake, HELLO_TIMEOUT_S)
            except TimeoutError:
                raise ProtocolError(f"no hello within {HELLO_TIMEOUT_S:g} s") from None
            ticket.release()  # both sides proved the secret, now
            self.connections += 1
            authenticated = True
            conn = self._open[handler] = _Connection(node)
            if self.connections > self.max_connections and not self._close_idlest():
                raise ProtocolError(f"more than {self.max_connections} peer connections")
            generation = self.agent.generation  # the agent whose metadata the peer gets
            reply = self._auth(msg)
            while True:
                writer.write(session.encode(Message("ok", msg.id, reply)))
                await writer.drain()
                conn.idle_since = time.monotonic()
                msg = await session.read(reader, body_timeout=FRAME_TIMEOUT_S)
                conn.idle_since = None
                if self.agent.generation != generation:
                    raise ProtocolError("the NIXL agent restarted: connect again")
                reply = await self._call(node, msg)
        except TimeoutError:
            log.warning("closing peer connection addr=%s reason=a frame stalled", addr)
        except asyncio.IncompleteReadError:
            pass  # the peer hung up
        except (ProtocolError, TransportError) as e:
            log.warning("closing peer connection addr=%s reason=%s", addr, e)
        except ConnectionError:
            pass
        except Exception as e:  # a request the tiers refused (a bad key, say): this peer only
            log.warning("closing peer connection addr=%s reason=%r", addr, e)
        except asyncio.CancelledError:
            pass  # the server is closing (a handler ending cancelled is logged as an error)
        finally:
            self._handlers.discard(handler)
            self._open.pop(handler, None)
            if ticket is not None:
                ticket.release()
            if authenticated:
                self.connections -= 1  # the peer's pins live on until unpinned or expired
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _close_idlest(self) -> bool:
        """Close the connection idle longest, if one has been for IDLE_CLOSE_S
        and its peer holds no pins (a pull reading over NIXL is quiet here);
        False when none may go."""
        now = time.monotonic()
        quiet = [
            (c.idle_since, task)
            for task, c in self._open.items()
            if c.idle_since is not None
            and now - c.idle_since >= IDLE_CLOSE_S
            and not self.pins.get(c.peer)
        ]
        if not quiet:
            return False
        since, task = min(quiet, key=lambda q: q[0])
        peer = self._open.pop(task).peer
        log.info(
            "closing an idle peer connection for a new one peer=%s idle_s=%.0f", peer, now - since
        )
        self.closed_idle += 1
        task.cancel()  # its handler ends as at close(): the writer closed, the count given back
        return True

    async def _call(self, peer: str, msg: Message) -> dict:
        if msg.call == "pin":
            return await self._pin(peer, msg)
        if msg.call == "unpin":
            self._release(peer, _keys(msg))
            return {}
        if msg.call in ("place", "locate"):
            if self.owner is None:
                raise ProtocolError("this node keeps no index shards")
            if msg.call == "locate":
                return {"runs": self.owner.holders(_places(msg), peer)}
            xs, tiers, session = _places(msg), msg.body.get("tiers"), msg.body.get("session")
            if not isinstance(tiers, list) or len(tiers) != len(xs):
                raise ProtocolError("place needs one tier per key")
            if not all(t is None or isinstance(t, str) for t in tiers):
                raise ProtocolError("a tier that is not a name")
            if type(session) is not int or not 0 < session < 2**64:
                raise ProtocolError("place needs a session (the lease of the node's record)")
            return {"ok": self.owner.place(peer, session, xs, tiers)}
        if msg.call in ("hello", "auth"):
            raise ProtocolError("hello must come first, and once")
        raise ProtocolError(f"{msg.call!r} is not a request")

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[SessionCodec, Message, str]:
        """hello (signed: the client's fresh nonce and node id) -> our nonce,
        node id and proof -> the client's first sealed frame, `auth`, which
        only a holder of the secret can seal under this connection's keys.
        Returns the session, that frame and the client's node id. No NIXL
        metadata moves before it, and none in clear."""
        hello = await self.codec.read(reader, max_frame=PRE_AUTH_MAX_FRAME)
        client_nonce = hello.body.get("nonce")
        fingerprints = hello.body.get("fingerprints")
        node = hello.body.get("node")
        if (
            hello.call != "hello"
            or not isinstance(client_nonce, bytes)
            or len(client_nonce) != HANDSHAKE_NONCE_BYTES
            or not isinstance(fingerprints, list)
            or not all(type(f) is int for f in fingerprints)
            or not isinstance(node, str)
            or not NODE_ID.fullmatch(node)
        ):
            raise ProtocolError("hello must come first, and once")
        if not set(fingerprints) & self.source.fingerprints:
            raise ProtocolError("no layout fingerprint in common: the nodes cannot share blocks")
        nonce = os.urandom(HANDSHAKE_NONCE_BYTES)
        proof = server_proof(self.secret, client_nonce, nonce)
        answer = {"nonce": nonce, "proof": proof, "node": self.node_id}
        writer.write(self.codec.encode(Message("ok", hello.id, answer)))
        await writer.drain()
        to_server, to_client = session_keys(self.secret, client_nonce, nonce)
        session = SessionCodec(to_client, to_server, CALLS)
        msg = await session.read(reader, max_frame=PRE_AUTH_MAX_FRAME)
        if msg.call != "auth":
            raise ProtocolError("hello must come first, and once")
        return session, msg, node

    def _auth(self, msg: Message) -> dict:
        if msg.body:
            raise ProtocolError("auth carries nothing (a server loads no peer's metadata)")
        return {
            "nixl": self.agent.metadata,
            "arena": self.agent.arena[0],
            "arena_bytes": self.agent.arena[1],
            "fingerprints": sorted(self.source.fingerprints),
        }

    async def _pin(self, peer: str, msg: Message) -> dict:
        keys = _keys(msg)
        asking = self._asking  # pins being taken now count against the caps too
        room = min(
            self.max_pins_per_peer - len(self.pins.get(peer, {})) - asking.get(peer, 0),
            self.max_pins_total - self.pinned_count - sum(asking.values()),
        )
        keys = keys[: max(0, min(room, self.source.step_blocks))]
        asking[peer] = asking.get(peer, 0) + len(keys)
        try:
            # what is ready in G2 pins here, with no thread hop; the rest (staged
            # from disk, or summed now) in a thread
            blocks = self.source.prepare_read(keys, ready_only=True) if keys else []
            if len(blocks) < len(keys):
                rest = asyncio.ensure_future(
                    asyncio.to_thread(self.source.prepare_read, keys[len(blocks) :])
                )
                try:
                    blocks += await asyncio.shield(rest)
                except BaseException:  # recorded nowhere: give back ours, and the thread's
                    self.source.complete_read(blocks)
                    rest.add_done_callback(self._give_back)
                    raise
        finally:
            asking[peer] -= len(keys)
            if not asking[peer]:
                del asking[peer]
        expiry = time.monotonic() + self.pin_ttl
        held = self.pins.setdefault(peer, {})  # after the await: the reaper may have dropped it
        again = []
        for b in blocks:
            if b.key in held:  # pinned for this peer already: one pin is enough
                again.append(b)
                held[b.key].expiry = expiry
            else:
                held[b.key] = _Pin(b, expiry)
        if again:
            self.source.complete_read(again)
        return {"blocks": [[b.key, b.offset, b.length, b.checksum] for b in blocks]}

    def _give_back(self, done: asyncio.Future[list[PinnedBlock]]) -> None:
        """Pins a thread took for a pin call that ended without them."""
        if not done.cancelled() and done.exception() is None:
            self.source.complete_read(done.result())


def _keys(msg: Message) -> list[bytes]:
    keys = msg.body.get("keys")
    if not isinstance(keys, list) or len(keys) > MAX_KEYS_PER_CALL:
        raise ProtocolError("bad key list")
    if not all(isinstance(k, bytes) and 0 < len(k) <= 256 for k in keys):
        raise ProtocolError("bad key")
    return keys


def _places(msg: Message) -> np.ndarray:
    """A sharded index's keys, by place (64 bits each, little-endian)."""
    raw = msg.body.get("places")
    if not isinstance(raw, bytes) or len(raw) % 8 or len(raw) > 8 * MAX_KEYS_PER_CALL:
        raise ProtocolError("bad place list")
    return np.frombuffer(raw, "<u8").astype(np.uint64, copy=False)


def _wire_places(xs: np.ndarray) -> bytes:
    return xs.astype("<u8", copy=False).tobytes()


class PeerClient:
    """One connection to one peer. Calls are multiplexed on it by id: a pull
    asks for its next pins while it reads the last ones, and an unpin goes out
    without waiting for its answer.

    Invariant: every call in flight has a future in `_pending`; when the
    connection ends, each of them fails at once (no caller waits past it).
    """

    def __init__(
        self,
        agent: Agent,
        secret: bytes,
        fingerprints: Iterable[int],
        node_id: str | None = None,
    ) -> None:
        """`node_id`: who we are to the peer (default: our agent's name)."""
        self.agent = agent
        self.node_id = node_id or agent.name
        self.remote_node = ""  # the peer's node id, from its signed answer
        self.secret = secret
        self.codec: SessionCodec | None = None  # once the handshake is done
        self.fingerprints = sorted(fingerprints)
        self.peer: Peer | None = None
        self.remote_arena = 0  # the peer's arena: base address and size, from its hello
        self.remote_arena_bytes = 0
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._background: set[asyncio.Task] = set()
        self._replies: asyncio.Task | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._closed: str | None = None
        self.heard = 0  # frames the peer has sent on this connection

    async def connect(
        self,
        host: str,
        port: int,
        timeout: float = 5.0,
        local_host: str | None = None,
        expect: str | None = None,
    ) -> None:
        """Connect and shake hands; `local_host` binds this side (a node's own
        address); `expect`: the node id the peer must answer with (another
        node now at that address is refused)."""
        local = (local_host, 0) if local_host else None
        reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, local_addr=local), timeout
        )
        try:
            self.codec = await asyncio.wait_for(self._handshake(reader, self._writer), timeout)
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            raise TransportError(f"the peer hung up during the handshake: {e!r}") from None
        if expect is not None and self.remote_node != expect:
            raise AuthError(f"the peer at {host}:{port} is {self.remote_node!r}, not {expect!r}")
        self._replies = asyncio.create_task(self._read_replies(reader))
        reply = await self.call("auth", {}, timeout)
        base, size = reply.get("arena"), reply.get("arena_bytes")
        if not all(type(v) is int and 0 <= v < 2**64 for v in (base, size)):
            raise ProtocolError("the peer's hello names no arena")
        self.remote_arena, self.remote_arena_bytes = base, size
        self.peer = self.agent.add_peer(reply["nixl"])

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> SessionCodec:
        """Our fresh nonce out (signed); the peer's nonce and its proof back,
        which only a holder of the secret could make for our nonce; then this
        connection's keys, one per direction."""
        hello = FrameCodec(self.secret, CALLS)
        nonce = os.urandom(HANDSHAKE_NONCE_BYTES)
        body = {"nonce": nonce, "fingerprints": self.fingerprints, "node": self.node_id}
        writer.write(hello.encode(Message("hello", 0, body)))
        await writer.drain()
        reply = await hello.read(reader, max_frame=PRE_AUTH_MAX_FRAME)
        theirs, proof = reply.body.get("nonce"), reply.body.get("proof")
        node = reply.body.get("node")
        if (
            reply.call != "ok"
            or not isinstance(node, str)
            or not isinstance(theirs, bytes)
            or len(theirs) != HANDSHAKE_NONCE_BYTES
            or not isinstance(proof, bytes)
            or not hmac.compare_digest(proof, server_proof(self.secret, nonce, theirs))
        ):
            raise AuthError("the peer did not prove the secret")
        self.remote_node = node
        to_server, to_client = session_keys(self.secret, nonce, theirs)
        return SessionCodec(to_server, to_client, CALLS)

    @property
    def usable(self) -> bool:
        """Connected, said hello, not closed since, and our agent has not
        restarted since (then the peer has only its old metadata)."""
        return (
            self.peer is not None
            and self._writer is not None
            and not self._closed
            and self.agent.knows(self.peer)
        )

    @property
    def hung_up(self) -> bool:
        """The peer closed the connection (rather than sent what we refused)."""
        return self._closed == HUNG_UP

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                assert self.codec is not None
                msg = await self.codec.read(reader)
                self.heard += 1
                waiter = self._pending.pop(msg.id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(msg)
        except (asyncio.IncompleteReadError, ConnectionError):
            self._closed = HUNG_UP
        except (ProtocolError, TransportError) as e:
            self._closed = f"bad reply from peer: {e}"
            log.warning("closing peer connection peer=%s reason=%s", self.peer, e)
        finally:
            self._closed = self._closed or "connection closed"
            for waiter in self._pending.values():
                if not waiter.done():
                    waiter.set_exception(TransportError(self._closed))
            self._pending.clear()

    async def call(self, name: str, body: dict, timeout: float) -> dict:
        msg_id, waiter = self._send(name, body)
        try:
            async with asyncio.timeout(timeout):  # no task per call, as wait_for makes in 3.11
                await self._writer.drain()  # type: ignore[union-attr]
                reply = await waiter
        except ConnectionError as e:
            raise TransportError(f"peer closed the connection during {name}") from e
        finally:
            self._pending.pop(msg_id, None)
        if reply.call != "ok":
            raise TransportError(f"peer refused {name}: {reply.body}")
        return reply.body

    def call_later(self, name: str, body: dict, timeout: float) -> None:
        """Send a call now; nobody waits for its answer (a failure is logged).
        Calls sent after it reach the peer after it."""
        try:
            msg_id, waiter = self._send(name, body)
        except TransportError as e:
            log.info("%s not sent peer=%s error=%s", name, self.peer, e)
            return

        async def settle() -> None:
            try:
                reply = await asyncio.wait_for(waiter, timeout)
                if reply.call != "ok":
                    log.info("peer refused %s peer=%s reply=%s", name, self.peer, reply.body)
            except (TimeoutError, TransportError) as e:
                log.info("%s failed peer=%s error=%r", name, self.peer, e)
            finally:
                self._pending.pop(msg_id, None)

        task = asyncio.create_task(settle())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _send(self, name: str, body: dict) -> tuple[int, asyncio.Future[Message]]:
        if self._writer is None or self._closed:
            raise TransportError(self._closed or "not connected")
        assert self.codec is not None, "calls go out after the handshake"
        msg_id = next(self._ids)
        waiter = self._pending[msg_id] = asyncio.get_running_loop().create_future()
        self._writer.write(self.codec.encode(Message(name, msg_id, body)))
        return msg_id, waiter

    async def close(self) -> None:
        if self._background:  # unpins in flight: let them reach the peer
            await asyncio.wait(list(self._background), timeout=1.0)
        if self.peer is not None:
            self.agent.remove_peer(self.peer)
            self.peer = None
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        if self._replies is not None:
            self._replies.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replies
        self._closed = self._closed or "closed"


ROUND_BYTES = 64 << 20  # per pin -> READ round; the next round's pin overlaps this one's READ
# From a peer's disk: smaller rounds, the first smallest, so that reading a
# round overlaps the peer's staging of the next, and the first READ waits less.
STAGED_ROUND_BYTES = 16 << 20
STAGED_FIRST_ROUND_BYTES = 4 << 20
MAX_ROUND_BLOCKS = 64  # however small the blocks
CHUNK_BYTES = 8 << 20  # per READ in a round: verified while the next is copied, still in cache


async def place(
    client: PeerClient, session: int, xs: np.ndarray, tiers: list[str | None], timeout: float
) -> bool:
    """Tell the peer, an owner of these keys' shards, which of them (by place:
    discovery/owners.py) this node holds (tier names; None: no longer).
    False: the owner does not see this session (the lease of this node's
    record) on the record yet, or any more."""
    body = {"places": _wire_places(xs), "tiers": tiers, "session": session}
    reply = await client.call("place", body, timeout)
    return reply.get("ok") is True


async def locate(
    client: PeerClient, xs: np.ndarray, timeout: float
) -> list[tuple[int, dict[str, str]]]:
    """Who holds each key (by place), as the peer, their owner, knows: runs of
    (n, node -> tier name) for n consecutive keys. The shape is checked
    here; names and tiers are the caller's to check."""
    reply = await client.call("locate", {"places": _wire_places(xs)}, timeout)
    runs = reply.get("runs")
    if not isinstance(runs, list) or len(runs) > len(xs):
        raise ProtocolError("locate answered for other keys")
    total = 0
    for run in runs:
        if not isinstance(run, list) or len(run) != 2:
            raise ProtocolError("locate answered with a bad run")
        n, h = run
        if type(n) is not int or n < 1 or not isinstance(h, dict) or len(h) > MAX_HOLDERS:
            raise ProtocolError("locate answered with a bad run")
        if not all(isinstance(k, str) and isinstance(t, str) for k, t in h.items()):
            raise ProtocolError("locate answered with a bad holder list")
        total += n
    if total != len(xs):
        raise ProtocolError("locate answered for other keys")
    return [(n, h) for n, h in runs]


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
