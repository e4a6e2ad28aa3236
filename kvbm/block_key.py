"""The block key: one type everywhere, its encoded bytes, and its one codec.

A key names (namespace, layout fingerprint, rank, sequence hash): two
nodes exchange a block only when all four agree. The rank is the engine
worker's share of the block, in vLLM's numbering of its workers: pipeline
stage * tensor-parallel size + tensor-parallel rank (its heads of its
stage's layers; the fingerprint names how many of each). Engines build keys
(`KeySpace.keys`), and from then on a key is only ever these bytes: on the
engine socket, in the tiers' tables, in the index, on the peer RPC and in
the disk header. Fields are read back (`parse_key`) only where a field is
needed: checking keys that come from outside (`check_keys`), and a disk
header found at recovery.

Layout: the sequence hash as the key's head (kvbm/hashing.py; its size and
byte order are discovery/key_split.py's, which the index reads keys by),
then the key's tail: fingerprint (u64), rank (u16), the namespace's length
(u8), the namespace. `transport` and `discovery` never import this module;
to them a key is bytes split into head and tail.

A sharded index keeps a prompt's keys together, in groups of GROUP_BLOCKS
positions, each group at the owner of its first key, its anchor
(discovery/owners.py). A key's anchor is a function of the key (a sequence
hash names its whole prefix, so its position too) that cannot be computed
from the key: engines, which know positions, name it (`Groups`), and the
node keeps it with the block. An anchor is the first word of its key's
head (key_split.first_word, a u64): it only places keys, which are advice
until a pin checks the whole key, and 64 bits of a keyed hash place as well
as 128.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, NewType

import numpy as np

from discovery import key_split
from discovery.key_split import HEAD_BYTES as HEAD
from discovery.records import check_namespace

BlockKey = NewType("BlockKey", bytes)

_TAIL = struct.Struct("<QHB")  # fingerprint, rank, len(namespace)
_MIN_SIZE = HEAD + _TAIL.size
MAX_ENCODED = _MIN_SIZE + 64


GROUP_BLOCKS = 16


@dataclass(frozen=True, slots=True)
class Groups:
    """The anchors of consecutive keys of a prompt: key i of them sits at
    position `offset + i` from the start of the first group, so its anchor
    is `anchors[(offset + i) // GROUP_BLOCKS]` (the first word of a
    sequence hash, see `anchor_of`)."""

    offset: int
    anchors: Sequence[int]

    @classmethod
    def of(cls, seq_hashes: Sequence[int], start: int, stop: int) -> Groups:
        """The groups of positions start..stop-1 of a prompt whose blocks'
        sequence hashes from position 0 are `seq_hashes`."""
        offset = start % GROUP_BLOCKS
        return cls(offset, [anchor_of(h) for h in seq_hashes[start - offset : stop : GROUP_BLOCKS]])

    def per_key(self, n: int) -> np.ndarray:
        """Each of the n keys' anchor (uint64)."""
        at = (np.arange(n) + self.offset) // GROUP_BLOCKS
        return np.asarray(self.anchors, np.uint64)[at]

    def part(self, at: int, n: int) -> Groups:
        """The groups of the n keys from the `at`-th on (a call names exactly
        its own keys' anchors)."""
        skip, offset = divmod(self.offset + at, GROUP_BLOCKS)
        return Groups(offset, self.anchors[skip : skip + (offset + n - 1) // GROUP_BLOCKS + 1])

    def to_wire(self) -> list[int]:
        return [self.offset, *self.anchors]

    @classmethod
    def from_wire(cls, raw: object, n: int) -> Groups:
        """The groups of n keys, from an engine; ValueError unless they name
        each key's anchor, and no more."""
        if not isinstance(raw, list) or not raw or not all(type(x) is int for x in raw):
            raise ValueError("groups must be a list of ints: offset, then anchors")
        offset, anchors = raw[0], raw[1:]
        if not 0 <= offset < GROUP_BLOCKS or not all(0 <= a < 2**64 for a in anchors):
            raise ValueError("groups out of range")
        if n and len(anchors) != (offset + n - 1) // GROUP_BLOCKS + 1:
            raise ValueError(f"groups name {len(anchors)} anchors, not those of {n} keys")
        return cls(offset, anchors)


def anchor_of(seq_hash: int) -> int:
    """The anchor a key with this sequence hash gives its group: its head's
    first word (discovery/key_split.py), as a u64."""
    return key_split.first_word(seq_hash)


class KeyFields(NamedTuple):
    namespace: str
    fingerprint: int
    rank: int
    seq_hash: int


def encode_key(namespace: str, fingerprint: int, rank: int, seq_hash: int) -> BlockKey:
    """Raises ValueError for fields that `parse_key` could not read back."""
    return BlockKey(_head(seq_hash) + _tail(namespace, fingerprint, rank))


def parse_key(data: bytes | bytearray | memoryview) -> KeyFields:
    """The fields of a key; raises ValueError on anything `encode_key` did not produce."""
    if len(data) < _MIN_SIZE:
        raise ValueError("block key too short")
    key = bytes(data)
    namespace, fingerprint, rank = _parse_tail(key_split.tail(key))
    return KeyFields(namespace, fingerprint, rank, key_split.head_value(key))


def seq_hash(key: bytes) -> int:
    return key_split.head_value(key)


def check_keys(keys: object, namespace: str, fingerprint: int, max_keys: int) -> list[BlockKey]:
    """Keys from outside (an engine's call): a list of at most `max_keys` well-formed
    keys of this namespace and layout fingerprint (any rank), or ValueError.
    A request's keys share one tail, so this parses each distinct tail once."""
    if not isinstance(keys, list) or len(keys) > max_keys:
        raise ValueError(f"keys must be a list of at most {max_keys}")
    good: set[bytes] = set()
    for k in keys:
        if not isinstance(k, bytes) or len(k) < _MIN_SIZE:
            raise ValueError("a key is not a block key")
        tail = key_split.tail(k)
        if tail not in good:
            ns, fp, _ = _parse_tail(tail)
            if ns != namespace or fp != fingerprint:
                raise ValueError(f"a key of namespace {ns!r}, fingerprint {fp:#x}: not this node's")
            good.add(tail)
    return keys


def _head(seq_hash: int) -> bytes:
    try:
        return key_split.head_of(seq_hash)
    except (OverflowError, AttributeError, TypeError):
        raise ValueError(f"block key seq_hash out of range: {seq_hash!r}") from None


# A request's keys share everything but the sequence hash, so the rest of a
# key (its tail) is packed and parsed once per key space, not once per key.
@functools.lru_cache(maxsize=256)
def _tail(namespace: str, fingerprint: int, rank: int) -> bytes:
    ns = check_namespace(namespace).encode()
    try:
        return _TAIL.pack(fingerprint, rank, len(ns)) + ns
    except struct.error as e:
        raise ValueError(f"block key field out of range: {e}") from None


@functools.lru_cache(maxsize=256)
def _parse_tail(tail: bytes) -> tuple[str, int, int]:
    fingerprint, rank, n = _TAIL.unpack_from(tail)
    if len(tail) != _TAIL.size + n:
        raise ValueError("block key length does not match its namespace length")
    try:
        namespace = tail[_TAIL.size :].decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise ValueError("block key namespace is not UTF-8") from None
    return check_namespace(namespace), fingerprint, rank


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Everything in a key but the sequence hash: what one engine rank writes under."""

    namespace: str
    fingerprint: int
    rank: int = 0

    def __post_init__(self) -> None:
        check_namespace(self.namespace)
        if not 0 <= self.rank < 2**16:
            raise ValueError(f"rank out of range: {self.rank}")
        _tail(self.namespace, self.fingerprint, self.rank)  # the fingerprint's range

    def keys(self, seq_hashes: list[int]) -> list[BlockKey]:
        tail = _tail(self.namespace, self.fingerprint, self.rank)
        # key_split.head_of, inlined: an engine builds a request's keys on
        # vLLM's scheduler path, so no call per key (test_block_key checks they agree)
        try:
            return [h.to_bytes(HEAD, "little") + tail for h in seq_hashes]  # type: ignore[misc]
        except (OverflowError, AttributeError, TypeError):
            raise ValueError("block key seq_hash out of range") from None
