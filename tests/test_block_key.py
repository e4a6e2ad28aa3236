"""kvbm.block_key: the binary codec of a block key and the KeySpace that builds keys."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm.block_key import MAX_ENCODED, BlockKey, KeySpace, check_namespace

U64 = st.integers(0, 2**64 - 1)
NAMESPACE_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"
namespaces = st.text(alphabet=NAMESPACE_CHARS, min_size=1, max_size=64)
HEAD = 8 + 8 + 2 + 1  # seq_hash u64, fingerprint u64, tp_rank u16, namespace length u8


def raw_key(seq_hash: int, fingerprint: int, tp_rank: int, ns: bytes, n: int | None = None):
    """Bytes in the wire format, written by hand, with an optionally lying length byte."""
    return struct.pack("<QQHB", seq_hash, fingerprint, tp_rank, len(ns) if n is None else n) + ns


def expect_rejected(data: bytes) -> None:
    with pytest.raises(ValueError):
        BlockKey.decode(data)


# --- round trip -----------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(ns=namespaces, fp=U64, rank=st.integers(0, 65535), seq=U64)
def test_encode_decode_round_trip(ns, fp, rank, seq):
    key = BlockKey(ns, fp, rank, seq)
    data = key.encode()
    assert len(data) == HEAD + len(ns) <= MAX_ENCODED
    assert BlockKey.decode(data) == key
    assert BlockKey.decode(memoryview(data)) == key
    assert BlockKey.decode(bytearray(data)) == key


def test_encoding_is_the_documented_wire_format():
    # seq_hash, fingerprint, tp_rank, len(ns) little-endian, then the namespace bytes
    key = BlockKey("prod", fingerprint=0x0102030405060708, tp_rank=3, seq_hash=2**64 - 1)
    assert key.encode() == raw_key(2**64 - 1, 0x0102030405060708, 3, b"prod")
    assert key.encode()[:8] == b"\xff" * 8
    assert MAX_ENCODED == HEAD + 64


def test_keys_are_plain_tuples():
    a = BlockKey("ns", 1, 0, 42)
    assert a == ("ns", 1, 0, 42)
    assert hash(a) == hash(BlockKey("ns", 1, 0, 42))
    assert len({a, BlockKey("ns", 1, 0, 42), BlockKey("ns", 1, 1, 42)}) == 2


# --- decode rejects -------------------------------------------------------------------------


def test_decode_rejects_truncated_data():
    data = BlockKey("namespace", 7, 1, 99).encode()
    # every strict prefix is rejected: inside the header and inside the namespace
    for cut in range(len(data)):
        expect_rejected(data[:cut])


def test_decode_rejects_trailing_garbage():
    data = BlockKey("namespace", 7, 1, 99).encode()
    expect_rejected(data + b"\x00")
    expect_rejected(data + b"x")
    expect_rejected(data + data)


def test_decode_rejects_a_lying_length_byte():
    expect_rejected(raw_key(1, 2, 3, b"abc", n=2))
    expect_rejected(raw_key(1, 2, 3, b"abc", n=4))


def test_decode_rejects_bad_utf8():
    expect_rejected(raw_key(1, 2, 3, b"ab\xff"))
    expect_rejected(raw_key(1, 2, 3, b"\xc3"))  # truncated two-byte sequence


@pytest.mark.parametrize(
    "ns",
    [b"", b"has space", b"a/b", b"x" * 65, "caf\u00e9".encode(), b"a:b", b"\x00"],
    ids=["empty", "space", "slash", "too-long", "non-ascii", "colon", "nul"],
)
def test_decode_rejects_bad_namespaces(ns):
    expect_rejected(raw_key(1, 2, 3, ns))


# --- namespaces and KeySpace ----------------------------------------------------------------


@pytest.mark.parametrize("ns", ["a", "prod", "team.model-v2_0", "A" * 64, "...", "-"])
def test_check_namespace_accepts_plain_names(ns):
    assert check_namespace(ns) == ns


@pytest.mark.parametrize(
    "ns", ["", "a b", "a/b", "x" * 65, "caf\u00e9", "\u0661", "tab\tname", "a*"]
)
def test_check_namespace_rejects(ns):
    with pytest.raises(ValueError, match="namespace"):
        check_namespace(ns)


@pytest.mark.parametrize("ns", ["", "a b", "x" * 65, "a/b"])
def test_keyspace_validates_namespace(ns):
    with pytest.raises(ValueError):
        KeySpace(ns, fingerprint=1)


@pytest.mark.parametrize("rank", [-1, 65536, 2**32])
def test_keyspace_validates_tp_rank(rank):
    with pytest.raises(ValueError, match="tp_rank"):
        KeySpace("ns", fingerprint=1, tp_rank=rank)


def test_keyspace_accepts_edge_ranks():
    assert KeySpace("ns", 1).tp_rank == 0
    assert KeySpace("ns", 1, tp_rank=65535).tp_rank == 65535


def test_keyspace_is_frozen():
    space = KeySpace("ns", 1)
    with pytest.raises(AttributeError):
        space.tp_rank = 2  # type: ignore[misc]


def test_keyspace_keys_builds_block_keys():
    space = KeySpace("prod", fingerprint=0xABC, tp_rank=2)
    # [10, 20, 30] -> one key each, in order, everything but the hash from the space
    keys = space.keys([10, 20, 30])
    assert keys == [
        BlockKey("prod", 0xABC, 2, 10),
        BlockKey("prod", 0xABC, 2, 20),
        BlockKey("prod", 0xABC, 2, 30),
    ]
    assert all(type(k) is BlockKey for k in keys)
    assert space.keys([]) == []
    # and each survives the wire
    assert [BlockKey.decode(k.encode()) for k in keys] == keys


def test_trailing_newline_is_not_a_valid_namespace():
    with pytest.raises(ValueError):
        check_namespace("abc\n")
    with pytest.raises(ValueError):
        BlockKey("abc\n", 1, 2, 3).encode()


def test_encode_refuses_what_decode_could_not_read():
    with pytest.raises(ValueError):
        BlockKey("x" * 65, 1, 0, 1).encode()
    with pytest.raises(ValueError):
        BlockKey("ok", 2**64, 0, 1).encode()
    with pytest.raises(ValueError):
        BlockKey("ok", 1, 2**16, 1).encode()
