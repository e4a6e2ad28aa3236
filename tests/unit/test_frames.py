"""The peer RPC codec against bad input: random bytes, truncation, oversized
lengths, forged MACs, unknown versions and calls, replays, and fuzzing."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import struct
import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.errors import AuthError, ProtocolError
from transport.frames import FrameCodec, Message, SessionCodec, server_proof, session_keys

SECRET = b"s" * 32
CALLS = ("hello", "pin", "unpin")


def codec(**kw) -> FrameCodec:
    return FrameCodec(SECRET, CALLS, **kw)


def signed(payload: dict | bytes, secret: bytes = SECRET) -> bytes:
    """A frame body (after the length prefix) with a valid MAC over `payload`."""
    raw = payload if isinstance(payload, bytes) else msgpack.packb(payload, use_bin_type=True)
    return hmac.new(secret, raw, hashlib.sha256).digest() + raw


def fields(**over) -> dict:
    d = {"v": 1, "call": "pin", "id": 7, "ts": time.time(), "nonce": b"n" * 16, "body": {}}
    d.update(over)
    return d


def test_round_trip():
    c = codec()
    frame = c.encode(Message("pin", 3, {"keys": [b"k1", b"k2"], "n": 2}))
    assert c.frame_length(frame[:4]) == len(frame) - 4
    msg = codec().decode(frame[4:])
    assert msg == Message("pin", 3, {"keys": [b"k1", b"k2"], "n": 2})


@pytest.mark.parametrize(
    ("body", "error"),
    [
        pytest.param(b"\x00" * 40, AuthError, id="random bytes"),
        pytest.param(signed(b"\xc1\xc1"), ProtocolError, id="not msgpack"),
        pytest.param(signed([1, 2, 3]), ProtocolError, id="not a map"),
        pytest.param(signed(fields(v=2)), ProtocolError, id="unknown protocol version"),
        pytest.param(signed(fields(call="format_disk")), ProtocolError, id="unknown call"),
        pytest.param(signed(fields(extra=1)), ProtocolError, id="frame map"),
        pytest.param(signed(fields(id="7")), ProtocolError, id="bad id"),
        pytest.param(signed(fields(nonce=b"short")), ProtocolError, id="bad nonce"),
        pytest.param(signed(fields(ts=time.time() - 3600)), AuthError, id="stale"),
        pytest.param(signed(fields(ts=True)), AuthError, id="stale: not a number"),
        pytest.param(signed(fields(), secret=b"x" * 32), AuthError, id="bad HMAC"),
    ],
)
def test_bad_frames_are_refused(body, error):
    with pytest.raises(error):
        codec().decode(body)


def test_a_truncated_frame_fails_its_mac():
    frame = codec().encode(Message("hello", 1, {"agent": "a"}))
    with pytest.raises(AuthError):
        codec().decode(frame[4:-3])


def test_an_oversized_length_is_refused_before_reading_it():
    c = codec(max_frame=4096)
    with pytest.raises(ProtocolError, match="exceeds"):
        c.frame_length(struct.pack(">I", 2**32 - 1))
    with pytest.raises(ProtocolError, match="too short"):
        c.frame_length(struct.pack(">I", 3))
    with pytest.raises(ValueError, match="exceeds"):
        c.encode(Message("pin", 1, {"blob": b"x" * 8192}))


def test_a_replayed_frame_is_refused_even_on_another_connection():
    server = codec()  # one codec for all of a server's connections
    frame = codec().encode(Message("unpin", 9, {}))
    assert server.decode(frame[4:]).id == 9
    with pytest.raises(AuthError, match="replayed"):
        server.decode(frame[4:])


def test_a_short_secret_is_refused():
    with pytest.raises(ValueError, match="at least 16 bytes"):
        FrameCodec(b"short", CALLS)


def test_reading_from_a_stream_stops_at_a_truncated_frame():
    async def scenario():
        reader = asyncio.StreamReader()
        frame = codec().encode(Message("pin", 1, {"keys": [b"a"]}))
        reader.feed_data(frame + frame[: len(frame) // 2])
        reader.feed_eof()
        c = codec()
        assert (await c.read(reader)).call == "pin"
        with pytest.raises(asyncio.IncompleteReadError):
            await c.read(reader)

    asyncio.run(scenario())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_any_bytes_are_refused_cleanly(data):
    c = codec(max_frame=4096)
    with pytest.raises(ProtocolError):
        c.decode(data)
    if len(data) >= 4:
        with contextlib.suppress(ProtocolError):
            assert 0 < c.frame_length(data[:4]) <= 4096


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(msgpack_values)
def test_fuzz_signed_garbage_is_refused_cleanly(value):
    # even with a valid MAC (a peer holding the key), malformed payloads only raise ProtocolError
    try:
        msg = codec().decode(signed(value))
    except ProtocolError:
        return
    assert isinstance(msg, Message)


# --- sealed frames (after the handshake) -------------------------------------------------------


def session_pair() -> tuple[SessionCodec, SessionCodec]:
    """A client's and a server's codec for one connection."""
    to_server, to_client = session_keys(b"s" * 32, b"c" * 32, b"n" * 32)
    calls = ("pin", "ok")
    return SessionCodec(to_server, to_client, calls), SessionCodec(to_client, to_server, calls)


def test_a_sealed_frame_opens_once_in_order_and_one_way():
    client, server = session_pair()
    one = client.encode(Message("pin", 1, {"keys": [b"k"]}))
    two = client.encode(Message("pin", 2, {}))
    assert b"pin" not in one  # sealed: nothing of the call shows
    assert server.decode(one[4:]) == Message("pin", 1, {"keys": [b"k"]})
    with pytest.raises(AuthError):
        server.decode(one[4:])  # the same frame again: a replay
    client2, server2 = session_pair()
    _, second = (client2.encode(Message("pin", i, {})) for i in (1, 2))
    with pytest.raises(AuthError):
        server2.decode(second[4:])  # out of order
    assert server.decode(two[4:]).id == 2
    reply = server.encode(Message("ok", 2, {}))
    with pytest.raises(AuthError):
        server.decode(reply[4:])  # its own direction's frame does not open as the other's
    assert client.decode(reply[4:]).call == "ok"


def test_a_tampered_or_foreign_sealed_frame_does_not_open():
    client, server = session_pair()
    frame = bytearray(client.encode(Message("pin", 1, {})))
    frame[-1] ^= 1
    with pytest.raises(AuthError):
        server.decode(bytes(frame[4:]))
    other = SessionCodec(*session_keys(b"s" * 32, b"d" * 32, b"n" * 32), ("pin", "ok"))
    with pytest.raises(AuthError):
        server.decode(other.encode(Message("pin", 1, {}))[4:])  # another connection's keys


def test_the_server_proof_is_bound_to_the_clients_nonce():
    proof = server_proof(b"s" * 32, b"c" * 32, b"n" * 32)
    assert proof != server_proof(b"s" * 32, b"d" * 32, b"n" * 32)
    assert proof != server_proof(b"t" * 32, b"c" * 32, b"n" * 32)
