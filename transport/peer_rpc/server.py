"""The serving side of the peer RPC (see the package's docstring for the
protocol): the handshake, the pins peers hold and their caps, and the calls
a node registers beyond pins (a dispatch table, as the engine server has).

Pins expire after `pin_ttl` seconds, so a requester that dies never leaks
them; a peer may hold at most `max_pins_per_peer` at once and all peers
together `max_pins_total`, so no peer can take the arena from the node's
own engines. A connection that sends anything malformed (a second hello
included) is closed with a logged reason; the server goes on serving its
other peers. At most `max_connections` peers are connected at once; a peer
that connects beyond that takes the place of the connection idle longest
(no call for IDLE_CLOSE_S, no pins held), so in a fleet larger than the cap
a node's idle peers reconnect when they next call instead of new ones being
refused. Before both sides have proved the secret a connection holds a
place at the gate of preauth.py: a few per source address,
MAX_UNAUTHENTICATED from all addresses together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

from transport.agent import Agent
from transport.block_ports import BlockSource, PinnedBlock
from transport.errors import ProtocolError, TransportError
from transport.frames import (
    HANDSHAKE_NONCE_BYTES,
    FrameCodec,
    Message,
    SessionCodec,
    server_proof,
    session_keys,
)
from transport.peer_rpc.wire import (
    CALLS,
    MAX_KEYS_PER_PIN,
    NODE_ID,
    PRE_AUTH_MAX_FRAME,
    WireVersions,
)
from transport.preauth import Gate, deepen_backlog, quiet_accept_errors

log = logging.getLogger("transport.rpc")
MAX_CONNECTIONS = 1024  # peers that said a valid hello (a fleet of about that many nodes)
IDLE_CLOSE_S = 5.0  # a connection quiet this long may give its place to a new peer
# Before a valid hello a connection costs the node little and not for long:
MAX_UNAUTHENTICATED_PER_ADDRESS = 16
MAX_UNAUTHENTICATED = 256  # from all addresses (the node's descriptors: daemon.fit_file_limit)
HELLO_TIMEOUT_S = 5.0  # from accept to a valid hello
FRAME_TIMEOUT_S = 10.0  # from a frame's length to its last byte
# A call the node registers: (the calling peer's node id, the call's body) ->
# the reply's body; ProtocolError for a body it refuses (the connection closes).
PeerCall = Callable[[str, dict], Awaitable[dict]]


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
        max_connections: int = MAX_CONNECTIONS,
        calls: Mapping[str, PeerCall] | None = None,
        versions: WireVersions | None = None,
    ) -> None:
        """`node_id`: this node, as its clients are told (default: the agent's name).
        `calls`: the node's own calls beyond pins, by name (a call not in the
        table is refused, and its connection closed). `versions`: the node's
        protocol version, said in every answer, and its rule for a client's
        (a client it refuses is told why); None (the transport's own tests
        and benches): no version said, none checked."""
        self.source = source
        self.versions = versions
        self.agent = agent
        self.node_id = node_id or agent.name
        self.secret = secret
        self.calls: Mapping[str, PeerCall] = dict(calls or {})
        clash = set(self.calls) & set(CALLS)
        if clash:
            raise ValueError(f"calls the peer RPC serves itself: {sorted(clash)}")
        self.call_names = (*CALLS, *self.calls)
        own: dict[str, PeerCall] = {"pin": self._pin, "unpin": self._unpin}
        self._dispatch = {**own, **self.calls}  # calls by name (hello and auth come first, once)
        # hellos: one codec, so one nonce memory
        self.codec = FrameCodec(secret, self.call_names)
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
        handler = self._dispatch.get(msg.call)
        if handler is not None:
            return await handler(peer, msg.body)
        if msg.call in ("hello", "auth"):
            raise ProtocolError("hello must come first, and once")
        raise ProtocolError(f"{msg.call!r} is not a request")

    async def _unpin(self, peer: str, body: dict) -> dict:
        self._release(peer, _keys(body))
        return {}

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[SessionCodec, Message, str]:
        """hello (signed: the client's fresh nonce, node id and protocol
        version) -> our nonce, node id, version and proof -> the client's
        first sealed frame, `auth`, which only a holder of the secret can seal
        under this connection's keys. Returns the session, that frame and the
        client's node id. No NIXL metadata moves before it, and none in clear.
        A client of a version the node does not talk to gets a signed `error`
        with the proof and the reason, naming both versions."""
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
        nonce = os.urandom(HANDSHAKE_NONCE_BYTES)
        proof = server_proof(self.secret, client_nonce, nonce)
        answer = {"nonce": nonce, "proof": proof, "node": self.node_id}
        if self.versions is not None:  # first: another version may mean other fingerprints
            answer["protocol"] = self.versions.ours
            them, us = f"peer {node}", f"node {self.node_id}"
            refused = self.versions.refusal(hello.body.get("protocol"), them, us)
            if refused is not None:  # said back, with the proof: not a stranger's word
                answer["error"] = refused
                writer.write(self.codec.encode(Message("error", hello.id, answer)))
                await writer.drain()
                raise ProtocolError(refused)
        if not set(fingerprints) & self.source.fingerprints:
            raise ProtocolError("no layout fingerprint in common: the nodes cannot share blocks")
        writer.write(self.codec.encode(Message("ok", hello.id, answer)))
        await writer.drain()
        to_server, to_client = session_keys(self.secret, client_nonce, nonce)
        session = SessionCodec(to_client, to_server, self.call_names)
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

    async def _pin(self, peer: str, body: dict) -> dict:
        keys = _keys(body)
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


def _keys(body: dict) -> list[bytes]:
    keys = body.get("keys")
    if not isinstance(keys, list) or len(keys) > MAX_KEYS_PER_PIN:
        raise ProtocolError("bad key list")
    if not all(isinstance(k, bytes) and 0 < len(k) <= 256 for k in keys):
        raise ProtocolError("bad key")
    return keys
