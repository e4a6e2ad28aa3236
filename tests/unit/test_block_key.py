"""kvbm.block_key: a key is its bytes; the codec that writes and reads them,
the KeySpace that builds keys, and the check of keys that come from outside."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery import key_split
from discovery.keytable import KeyTable
from discovery.owners import places
from discovery.runs import RunRecord
from discovery.tier import Tier
from kvbm.block_key import (
    GROUP_BLOCKS,
    MAX_ENCODED,
    Groups,
    KeyFields,
    KeySpace,
    anchor_of,
    check_keys,
    check_namespace,
    encode_key,
    parse_key,
    seq_hash,
)

U64 = st.integers(0, 2**64 - 1)
U128 = st.integers(0, 2**128 - 1)
NAMESPACE_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"
namespaces = st.text(alphabet=NAMESPACE_CHARS, min_size=1, max_size=64)
HEAD = 16 + 8 + 2 + 1  # seq_hash 128 bits, fingerprint u64, rank u16, namespace length u8


def raw_key(seq_hash: int, fingerprint: int, rank: int, ns: bytes, n: int | None = None):
    """Bytes in the wire format, written by hand, with an optionally lying length byte."""
    n = len(ns) if n is None else n
    return seq_hash.to_bytes(16, "little") + struct.pack("<QHB", fingerprint, rank, n) + ns


def expect_rejected(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_key(data)


# --- round trip -----------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(ns=namespaces, fp=U64, rank=st.integers(0, 65535), seq=U128)
def test_encode_parse_round_trip(ns, fp, rank, seq):
    data = encode_key(ns, fp, rank, seq)
    assert type(data) is bytes
    assert len(data) == HEAD + len(ns) <= MAX_ENCODED
    fields = KeyFields(ns, fp, rank, seq)
    assert parse_key(data) == fields
    assert parse_key(memoryview(data)) == fields
    assert parse_key(bytearray(data)) == fields
    assert seq_hash(data) == seq
    assert KeySpace(ns, fp, rank).keys([seq]) == [data]


def test_encoding_is_the_documented_wire_format():
    # seq_hash, fingerprint, rank, len(ns) little-endian, then the namespace bytes
    key = encode_key("prod", fingerprint=0x0102030405060708, rank=3, seq_hash=2**128 - 2)
    assert key == raw_key(2**128 - 2, 0x0102030405060708, 3, b"prod")
    assert key[:16] == b"\xfe" + b"\xff" * 15
    assert MAX_ENCODED == HEAD + 64


def test_keys_are_plain_bytes():
    a = encode_key("ns", 1, 0, 42)
    assert hash(a) == hash(encode_key("ns", 1, 0, 42))
    assert len({a, encode_key("ns", 1, 0, 42), encode_key("ns", 1, 1, 42)}) == 2


# --- decode rejects -------------------------------------------------------------------------


def test_decode_rejects_truncated_data():
    data = encode_key("namespace", 7, 1, 99)
    # every strict prefix is rejected: inside the header and inside the namespace
    for cut in range(len(data)):
        expect_rejected(data[:cut])


def test_decode_rejects_trailing_garbage():
    data = encode_key("namespace", 7, 1, 99)
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
    with pytest.raises(ValueError, match="rank"):
        KeySpace("ns", fingerprint=1, rank=rank)


def test_keyspace_accepts_edge_ranks():
    assert KeySpace("ns", 1).rank == 0
    assert KeySpace("ns", 1, rank=65535).rank == 65535


def test_keyspace_is_frozen():
    space = KeySpace("ns", 1)
    with pytest.raises(AttributeError):
        space.rank = 2  # type: ignore[misc]


def test_keyspace_keys_builds_block_keys():
    space = KeySpace("prod", fingerprint=0xABC, rank=2)
    # [10, 20, 30] -> one key each, in order, everything but the hash from the space
    keys = space.keys([10, 20, 30])
    assert keys == [
        encode_key("prod", 0xABC, 2, 10),
        encode_key("prod", 0xABC, 2, 20),
        encode_key("prod", 0xABC, 2, 30),
    ]
    assert all(type(k) is bytes for k in keys)
    assert space.keys([]) == []
    assert [parse_key(k) for k in keys] == [KeyFields("prod", 0xABC, 2, h) for h in (10, 20, 30)]
    with pytest.raises(ValueError, match="seq_hash"):
        space.keys([2**128])


def test_trailing_newline_is_not_a_valid_namespace():
    with pytest.raises(ValueError):
        check_namespace("abc\n")
    with pytest.raises(ValueError):
        encode_key("abc\n", 1, 2, 3)


def test_encode_refuses_what_parse_could_not_read():
    with pytest.raises(ValueError):
        encode_key("x" * 65, 1, 0, 1)
    with pytest.raises(ValueError):
        encode_key("ok", 2**64, 0, 1)
    with pytest.raises(ValueError):
        encode_key("ok", 1, 2**16, 1)
    with pytest.raises(ValueError):
        encode_key("ok", 1, 0, -1)
    with pytest.raises(ValueError):
        KeySpace("ok", 2**64)


# --- keys from outside ----------------------------------------------------------------------


def test_check_keys_takes_this_nodes_keys_of_any_rank():
    keys = KeySpace("prod", 7).keys([1, 2]) + KeySpace("prod", 7, rank=3).keys([1])
    assert check_keys(keys, "prod", 7, max_keys=3) == keys
    assert check_keys([], "prod", 7, max_keys=3) == []


@pytest.mark.parametrize(
    "bad",
    [
        "not a list",
        [b"short"],
        ["a str"],
        [encode_key("prod", 7, 0, 1) + b"x"],  # a tail no key has
        [encode_key("other", 7, 0, 1)],  # another namespace
        [encode_key("prod", 8, 0, 1)],  # another layout fingerprint
        KeySpace("prod", 7).keys([1, 2, 3, 4]),  # more than max_keys
        [encode_key("prod", 7, 0, 1), raw_key(1, 7, 0, b"prod", n=9)],  # a bad one after a good one
    ],
    ids=["not-list", "short", "str", "trailing", "namespace", "fingerprint", "too-many", "second"],
)
def test_check_keys_refuses(bad):
    with pytest.raises(ValueError):
        check_keys(bad, "prod", 7, max_keys=3)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 300), st.integers(0, 300), st.integers(0, 300), st.integers(1, 300))
def test_groups_name_each_keys_anchor_and_a_part_names_only_its_own(start, length, at, n):
    hashes = [1000 + i for i in range(700)]
    stop = start + length
    groups = Groups.of(hashes, start, stop)
    want = [hashes[p - p % GROUP_BLOCKS] for p in range(start, stop)]
    assert groups.per_key(length).tolist() == want
    assert Groups.from_wire(groups.to_wire(), length) == groups
    if at + n <= length:  # a call for keys at..at+n: exactly their anchors on the wire
        part = groups.part(at, n)
        assert part.per_key(n).tolist() == want[at : at + n]
        assert Groups.from_wire(part.to_wire(), n) == part


def test_groups_from_an_engine_must_name_exactly_the_calls_keys():
    ok = Groups.of(list(range(1, 100)), 10, 40).to_wire()  # 30 keys from position 10: 3 groups
    assert Groups.from_wire(ok, 30).per_key(30)[0] == 1
    with pytest.raises(ValueError):
        Groups.from_wire([*ok, 7], 30)  # an anchor more than its keys have
    for bad in ([], [GROUP_BLOCKS, 1], [-1, 1], [0, -1], [0, 2**64], [0, 1.5], "0,1"):
        with pytest.raises(ValueError):
            Groups.from_wire(bad, 1)


@settings(max_examples=200, deadline=None)
@given(namespaces, U64, st.integers(0, 2**16 - 1), U128)
def test_the_key_and_the_index_split_a_key_alike(ns, fp, rank, seq):
    # block_key writes keys; discovery reads their head and tail through
    # discovery/key_split.py: both must see the same parts
    space = KeySpace(ns, fp, rank)
    key, sibling = space.keys([seq, seq ^ 1])
    assert key == encode_key(ns, fp, rank, seq)
    assert key_split.head_of(seq) == key[: key_split.HEAD_BYTES]
    assert key_split.head_value(key) == seq == seq_hash(key)
    assert key_split.tail(key) == key_split.tail(sibling)  # a request's keys share a tail
    assert key_split.head_of(seq) + key_split.tail(key) == key
    # the anchor a key gives its group is the first word the index places by
    assert int(key_split.first_words([key])[0]) == anchor_of(seq)
    anchored = places([key], np.array([anchor_of(seq)], np.uint64))
    assert np.array_equal(anchored, places([key]))
    # a run record and the key table give back the very keys
    run = RunRecord.of([key, sibling], [Tier.HOST, Tier.DISK])
    assert run.tail == key_split.tail(key)
    assert run.heads == key[: key_split.HEAD_BYTES] + sibling[: key_split.HEAD_BYTES]
    assert run.block_keys() == [key, sibling]
    table = KeyTable()
    table.set(key, 7)
    assert list(table.items()) == [(key, 7)]
