"""The calling side of the peer RPC: one connection to one peer, its
handshake, and calls multiplexed on it by id."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import os
from collections.abc import Collection, Iterable

from transport.agent import Agent, Peer
from transport.errors import AuthError, ProtocolError, TransportError, VersionError
from transport.frames import (
    HANDSHAKE_NONCE_BYTES,
    FrameCodec,
    Message,
    SessionCodec,
    server_proof,
    session_keys,
)
from transport.peer_rpc.wire import CALLS, PRE_AUTH_MAX_FRAME, WireVersions

log = logging.getLogger("transport.rpc")
HUNG_UP = "peer closed the connection"


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
        calls: Collection[str] = (),
        versions: WireVersions | None = None,
    ) -> None:
        """`node_id`: who we are to the peer (default: our agent's name).
        `calls`: the calls beyond pins this client may make (those the
        peer's node registers with its server). `versions`: our protocol
        version, said in the hello, and the rule for the peer's (as the
        server's: None says none and checks none)."""
        self.agent = agent
        self.versions = versions
        self.remote_protocol: int | None = None  # the peer's, from its signed answer
        self.call_names = (*CALLS, *calls)
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
        hello = FrameCodec(self.secret, self.call_names)
        nonce = os.urandom(HANDSHAKE_NONCE_BYTES)
        body = {"nonce": nonce, "fingerprints": self.fingerprints, "node": self.node_id}
        if self.versions is not None:
            body["protocol"] = self.versions.ours
        writer.write(hello.encode(Message("hello", 0, body)))
        await writer.drain()
        reply = await hello.read(reader, max_frame=PRE_AUTH_MAX_FRAME)
        theirs, proof = reply.body.get("nonce"), reply.body.get("proof")
        node = reply.body.get("node")
        if (
            reply.call not in ("ok", "error")
            or not isinstance(node, str)
            or not isinstance(theirs, bytes)
            or len(theirs) != HANDSHAKE_NONCE_BYTES
            or not isinstance(proof, bytes)
            or not hmac.compare_digest(proof, server_proof(self.secret, nonce, theirs))
        ):
            raise AuthError("the peer did not prove the secret")
        self.remote_node = node
        said = reply.body.get("protocol")
        if reply.call == "error":  # proved: the peer's own refusal of us
            raise VersionError(f"the peer refused us: {str(reply.body.get('error'))[:400]}")
        if self.versions is not None:
            refused = self.versions.refusal(said, f"peer {node}", f"node {self.node_id}")
            if refused is not None:
                raise VersionError(refused)
        self.remote_protocol = said if type(said) is int else None
        to_server, to_client = session_keys(self.secret, nonce, theirs)
        return SessionCodec(to_server, to_client, self.call_names)

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
