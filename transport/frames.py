"""The peer RPC's one codec: length-prefixed, authenticated msgpack frames.

    frame   = u32 length (big endian) | 32-byte HMAC-SHA256 | payload
    payload = msgpack map {"v": 1, "call": str, "id": int, "ts": float,
                           "nonce": 16 bytes, "body": map}

The HMAC covers the payload under the fleet's shared secret. A payload must be
fresh (its timestamp within `window_s` of the receiver's clock) and never seen
before (its nonce remembered for that window), so a captured frame cannot be
replayed. Every size is bounded before anything is allocated: the length
prefix by `max_frame`, msgpack's strings by the same cap, its arrays and maps
by MAX_ITEMS and MAX_FIELDS.
Anything wrong raises ProtocolError (AuthError for a forged or replayed
frame); the server closes that connection and serves the others.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import os
import struct
import time
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import msgpack

from transport.errors import AuthError, ProtocolError

VERSION = 1
MAC_BYTES = 32
NONCE_BYTES = 16
DEFAULT_MAX_FRAME = 1 << 20
MAX_ITEMS = 1 << 16  # per msgpack array: more than any call sends (4096 keys)
MAX_FIELDS = 64  # per msgpack map: calls' bodies have a handful
_LEN = struct.Struct(">I")
_FIELDS = {"v", "call", "id", "ts", "nonce", "body"}


@dataclass(frozen=True)
class Message:
    call: str
    id: int
    body: dict[str, Any] = field(default_factory=dict)


class FrameCodec:
    """Encodes and checks frames for one shared secret. A server shares one
    codec among all its connections (on one event loop), so a frame replayed on
    another connection is caught too. Not thread-safe."""

    def __init__(
        self,
        secret: bytes,
        calls: Collection[str],
        max_frame: int = DEFAULT_MAX_FRAME,
        window_s: float = 30.0,
    ) -> None:
        if len(secret) < 16:
            raise ValueError("the peer RPC secret must be at least 16 bytes")
        self._secret = secret
        self.calls = frozenset(calls)
        self.max_frame = max_frame
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
        frame_len = MAC_BYTES + len(payload)
        if frame_len > self.max_frame:
            raise ValueError(f"frame of {frame_len} bytes exceeds the {self.max_frame}-byte cap")
        mac = hmac.new(self._secret, payload, hashlib.sha256).digest()
        return _LEN.pack(frame_len) + mac + payload

    # -- decoding ----------------------------------------------------------
    def frame_length(self, prefix: bytes, max_frame: int | None = None) -> int:
        """The length a 4-byte prefix announces, refused before any allocation."""
        (n,) = _LEN.unpack(prefix)
        cap = self.max_frame if max_frame is None else min(max_frame, self.max_frame)
        if n < MAC_BYTES + 1:
            raise ProtocolError(f"frame of {n} bytes is too short")
        if n > cap:
            raise ProtocolError(f"frame of {n} bytes exceeds the {cap}-byte cap")
        return n

    def decode(self, frame: bytes) -> Message:
        """One frame's body (after the length prefix) -> Message, or ProtocolError."""
        mac, payload = frame[:MAC_BYTES], frame[MAC_BYTES:]
        want = hmac.new(self._secret, payload, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, want):
            raise AuthError("bad HMAC")
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
        if not isinstance(d, dict) or set(d) != _FIELDS:
            raise ProtocolError("payload is not a frame map")
        if d["v"] != VERSION:
            raise ProtocolError(f"unknown protocol version {d['v']!r}")
        call, msg_id, ts, nonce, body = d["call"], d["id"], d["ts"], d["nonce"], d["body"]
        if not isinstance(call, str) or call not in self.calls:
            raise ProtocolError(f"unknown call {call!r}")
        if type(msg_id) is not int or not isinstance(body, dict):
            raise ProtocolError("bad id or body")
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
            raise ProtocolError("bad nonce")
        self._check_fresh(ts, nonce)
        return Message(call, msg_id, body)

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
        return self.decode(await asyncio.wait_for(reader.readexactly(n), body_timeout))
