"""The peer RPC's one codec: length-prefixed, authenticated msgpack frames,
in two kinds that share the framing and the bounds.

Signed frames (`FrameCodec`), for a connection's handshake (and the engine
socket):

    frame   = u32 length (big endian) | 32-byte HMAC-SHA256 | payload
    payload = msgpack map {"v": 1, "call": str, "id": int, "ts": float,
                           "nonce": 16 bytes, "body": map}

The HMAC covers the payload under the fleet's shared secret. A payload must be
fresh (its timestamp within `window_s` of the receiver's clock) and never seen
before (its nonce remembered for that window), so a captured frame cannot be
replayed.

Sealed frames (`SessionCodec`), for everything after the handshake:

    frame   = u32 length | ChaCha20-Poly1305(key of this direction,
                                             nonce = this direction's counter,
                                             msgpack {"call", "id", "body"})

Plain frames (`PlainCodec`), on a socket pair between a node and its own
NIXL agent process, which nobody else can reach:

    frame   = u32 length | msgpack {"call", "id", "body"}

Keys are the connection's own (derived from the secret and both sides'
handshake nonces, one per direction), so a sealed frame is unreadable on the
wire and cannot be replayed, reordered, or moved to another connection or
direction. Every size is bounded before anything is allocated: the length
prefix by `max_frame`, msgpack's strings by the same cap, its arrays and maps
by MAX_ITEMS and MAX_FIELDS. Anything wrong raises ProtocolError (AuthError
for a forged or replayed frame); the server closes that connection and
serves the others.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import os
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from transport.errors import AuthError, ProtocolError

VERSION = 1
MAC_BYTES = 32
NONCE_BYTES = 16
DEFAULT_MAX_FRAME = 1 << 20
MAX_ITEMS = 1 << 16  # per msgpack array: more than any call sends (4096 keys)
MAX_FIELDS = 64  # per msgpack map: calls' bodies have a handful
_LEN = struct.Struct(">I")
_FIELDS = {"v", "call", "id", "ts", "nonce", "body"}
_SESSION_FIELDS = {"call", "id", "body"}
TAG_BYTES = 16  # Poly1305
HANDSHAKE_NONCE_BYTES = 32


@dataclass(frozen=True)
class Message:
    call: str
    id: int
    body: dict[str, Any] = field(default_factory=dict)


class _Framing:
    """Length prefixes, bounded msgpack and stream reads: what both kinds share."""

    OVERHEAD = 0  # bytes of a frame that are not payload (a MAC, a tag)

    def __init__(self, calls: Collection[str], max_frame: int) -> None:
        self.calls = frozenset(calls)
        self.max_frame = max_frame

    def frame_length(self, prefix: bytes, max_frame: int | None = None) -> int:
        """The length a 4-byte prefix announces, refused before any allocation."""
        (n,) = _LEN.unpack(prefix)
        cap = self.max_frame if max_frame is None else min(max_frame, self.max_frame)
        if n < self.OVERHEAD + 1:
            raise ProtocolError(f"frame of {n} bytes is too short")
        if n > cap:
            raise ProtocolError(f"frame of {n} bytes exceeds the {cap}-byte cap")
        return n

    def decode(self, frame: bytes) -> Message:
        raise NotImplementedError

    async def read(
        self,
        reader: asyncio.StreamReader,
        max_frame: int | None = None,
        body_timeout: float | None = None,
    ) -> Message:
        """The next frame from a stream; IncompleteReadError at a clean EOF.
        `max_frame` lowers the size cap (a frame from a sender not yet
        authenticated); `body_timeout` bounds the wait for a frame's bytes once
        its length has come (TimeoutError), so a half-sent frame holds nothing
        for long."""
        n = self.frame_length(await reader.readexactly(_LEN.size), max_frame)
        async with asyncio.timeout(body_timeout):  # a task per frame, with wait_for in 3.11
            body = await reader.readexactly(n)
        return self.decode(body)

    def recv(self, sock: socket.socket) -> Message:
        """The next frame from a blocking socket (its timeout applies);
        ConnectionError when the other end has gone."""
        return self.decode(_recv_exactly(sock, self.frame_length(_recv_exactly(sock, _LEN.size))))

    def _framed(self, body: bytes) -> bytes:
        if len(body) > self.max_frame:
            raise ValueError(f"frame of {len(body)} bytes exceeds the {self.max_frame}-byte cap")
        return _LEN.pack(len(body)) + body

    def _unpack(self, payload: bytes, fields: set[str]) -> dict:
        cap = self.max_frame
        try:
            d = msgpack.unpackb(
                payload,
                raw=False,
                strict_map_key=True,
                max_str_len=cap,
                max_bin_len=cap,
                max_array_len=MAX_ITEMS,
                max_map_len=MAX_FIELDS,
                max_ext_len=0,
            )
        except Exception as e:
            raise ProtocolError(f"payload is not msgpack: {e!r}") from None
        if not isinstance(d, dict) or set(d) != fields:
            raise ProtocolError("payload is not a frame map")
        return d

    def _message(self, call: object, msg_id: object, body: object) -> Message:
        if not isinstance(call, str) or call not in self.calls:
            raise ProtocolError(f"unknown call {call!r}")
        if type(msg_id) is not int or not isinstance(body, dict):
            raise ProtocolError("bad id or body")
        return Message(call, msg_id, body)


class FrameCodec(_Framing):
    """Encodes and checks signed frames for one shared secret. A server shares
    one codec among all its connections (on one event loop), so a frame
    replayed on another connection is caught too. Not thread-safe."""

    OVERHEAD = MAC_BYTES

    def __init__(
        self,
        secret: bytes,
        calls: Collection[str],
        max_frame: int = DEFAULT_MAX_FRAME,
        window_s: float = 30.0,
    ) -> None:
        if len(secret) < 16:
            raise ValueError("the peer RPC secret must be at least 16 bytes")
        super().__init__(calls, max_frame)
        self._secret = secret
        self.window_s = window_s
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # nonce -> expiry

    # -- encoding ----------------------------------------------------------
    def encode(self, msg: Message) -> bytes:
        if msg.call not in self.calls:
            raise ValueError(f"unknown call {msg.call!r}")
        payload = msgpack.packb(
            {
                "v": VERSION,
                "call": msg.call,
                "id": msg.id,
                "ts": time.time(),
                "nonce": os.urandom(NONCE_BYTES),
                "body": msg.body,
            },
            use_bin_type=True,
        )
        mac = hmac.new(self._secret, payload, hashlib.sha256).digest()
        return self._framed(mac + payload)

    # -- decoding ----------------------------------------------------------
    def decode(self, frame: bytes) -> Message:
        """One frame's body (after the length prefix) -> Message, or ProtocolError."""
        mac, payload = frame[:MAC_BYTES], frame[MAC_BYTES:]
        want = hmac.new(self._secret, payload, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, want):
            raise AuthError("bad HMAC")
        d = self._unpack(payload, _FIELDS)
        if d["v"] != VERSION:
            raise ProtocolError(f"unknown protocol version {d['v']!r}")
        msg = self._message(d["call"], d["id"], d["body"])
        nonce = d["nonce"]
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
            raise ProtocolError("bad nonce")
        self._check_fresh(d["ts"], nonce)
        return msg

    def _check_fresh(self, ts: object, nonce: bytes) -> None:
        now = time.time()
        if (
            not isinstance(ts, float | int)
            or isinstance(ts, bool)
            or not math.isfinite(ts)  # NaN compares false with everything: never fresh
            or abs(now - ts) > self.window_s
        ):
            raise AuthError("stale or future timestamp")
        seen = self._seen
        while seen and next(iter(seen.values())) < now:
            seen.popitem(last=False)
        if nonce in seen:
            raise AuthError("replayed frame")
        seen[nonce] = now + 2 * self.window_s


class SessionCodec(_Framing):
    """Sealed frames of one connection after its handshake: `send_key` seals
    what this side sends, `recv_key` opens what it receives, each direction
    with its own counter as the AEAD nonce. Not thread-safe."""

    OVERHEAD = TAG_BYTES

    def __init__(
        self,
        send_key: bytes,
        recv_key: bytes,
        calls: Collection[str],
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        super().__init__(calls, max_frame)
        self._seal, self._open = ChaCha20Poly1305(send_key), ChaCha20Poly1305(recv_key)
        self._sent = self._received = 0

    def encode(self, msg: Message) -> bytes:
        if msg.call not in self.calls:
            raise ValueError(f"unknown call {msg.call!r}")
        payload = msgpack.packb(
            {"call": msg.call, "id": msg.id, "body": msg.body}, use_bin_type=True
        )
        return self.seal(payload)

    def seal(self, payload: bytes) -> bytes:
        """A frame around any payload (tests build hostile payloads with it)."""
        sealed = self._seal.encrypt(_counter(self._sent), payload, None)
        self._sent += 1
        return self._framed(sealed)

    def decode(self, frame: bytes) -> Message:
        try:
            payload = self._open.decrypt(_counter(self._received), frame, None)
        except InvalidTag:
            raise AuthError(
                "a sealed frame that does not open (forged, replayed or reordered)"
            ) from None
        self._received += 1
        d = self._unpack(payload, _SESSION_FIELDS)
        return self._message(d["call"], d["id"], d["body"])


class PlainCodec(_Framing):
    """Frames on a channel no one else can reach (a socket pair to a child
    process): no MAC, the same framing and bounds."""

    def encode(self, msg: Message) -> bytes:
        if msg.call not in self.calls:
            raise ValueError(f"unknown call {msg.call!r}")
        body = {"call": msg.call, "id": msg.id, "body": msg.body}
        return self._framed(msgpack.packb(body, use_bin_type=True))

    def decode(self, frame: bytes) -> Message:
        d = self._unpack(frame, _SESSION_FIELDS)
        return self._message(d["call"], d["id"], d["body"])


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    """`n` bytes from a blocking socket; ConnectionError if it closes first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the other end closed the channel")
        buf += chunk
    return bytes(buf)


def session_keys(secret: bytes, client_nonce: bytes, server_nonce: bytes) -> tuple[bytes, bytes]:
    """(client -> server key, server -> client key) of one connection."""
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=64,
        salt=client_nonce + server_nonce,
        info=b"kvbm-session-v1",
    ).derive(secret)
    return okm[:32], okm[32:]


def server_proof(secret: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """What a server answers a client's hello with: it knows the secret, now
    (the client's fresh nonce is in it)."""
    return hmac.new(
        secret, b"kvbm-server-proof-v1" + client_nonce + server_nonce, hashlib.sha256
    ).digest()


def _counter(n: int) -> bytes:
    return n.to_bytes(12, "little")
