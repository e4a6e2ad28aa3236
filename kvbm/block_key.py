"""The block key and its one binary codec.

A key is (namespace, layout fingerprint, tp rank, sequence hash): two nodes
exchange a block only when all four agree. `transport` and `discovery` never
import this module; they carry keys as the bytes `encode` produces.
"""

from __future__ import annotations

import functools
import re
import struct
from dataclasses import dataclass
from typing import NamedTuple

# a key: seq_hash as 8 little-endian bytes, then its tail: this, then the namespace
_TAIL = struct.Struct("<QHB")  # fingerprint, tp_rank, len(namespace)
_HEAD_SIZE = 8 + _TAIL.size
_NAMESPACE = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_ENCODED = _HEAD_SIZE + 64


def check_namespace(namespace: str) -> str:
    """Namespaces end up in etcd paths and file headers: keep them plain."""
    if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
        raise ValueError(f"namespace must match {_NAMESPACE.pattern}, got {namespace!r}")
    return namespace


class BlockKey(NamedTuple):
    """A tuple, so hashing and equality run in C: the pools hash keys millions of times."""

    namespace: str
    fingerprint: int
    tp_rank: int
    seq_hash: int

    def encode(self) -> bytes:
        """Raises ValueError for a key that `decode` could not read back."""
        try:
            head = self.seq_hash.to_bytes(8, "little")
        except (OverflowError, AttributeError, TypeError):
            raise ValueError(f"block key seq_hash out of range: {self.seq_hash!r}") from None
        return head + _tail(self.namespace, self.fingerprint, self.tp_rank)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> BlockKey:
        """Inverse of `encode`; raises ValueError on anything it did not produce."""
        if len(data) < _HEAD_SIZE:
            raise ValueError("block key too short")
        namespace, fingerprint, tp_rank = _parse_tail(bytes(data[8:]))
        return _new(cls, (namespace, fingerprint, tp_rank, int.from_bytes(data[:8], "little")))


_new = tuple.__new__  # a NamedTuple without its Python-level __new__: keys are made in bulk


# A request's keys share everything but the sequence hash, so the rest of a
# key (its tail) is packed and parsed once per key space, not once per key.
@functools.lru_cache(maxsize=256)
def _tail(namespace: str, fingerprint: int, tp_rank: int) -> bytes:
    ns = check_namespace(namespace).encode()
    try:
        return _TAIL.pack(fingerprint, tp_rank, len(ns)) + ns
    except struct.error as e:
        raise ValueError(f"block key field out of range: {e}") from None


@functools.lru_cache(maxsize=256)
def _parse_tail(tail: bytes) -> tuple[str, int, int]:
    fingerprint, tp_rank, n = _TAIL.unpack_from(tail)
    if len(tail) != _TAIL.size + n:
        raise ValueError("block key length does not match its namespace length")
    namespace = tail[_TAIL.size :].decode("utf-8", errors="strict")
    return check_namespace(namespace), fingerprint, tp_rank


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Everything in a key but the sequence hash: what one engine rank writes under."""

    namespace: str
    fingerprint: int
    tp_rank: int = 0

    def __post_init__(self) -> None:
        check_namespace(self.namespace)
        if not 0 <= self.tp_rank < 2**16:
            raise ValueError(f"tp_rank out of range: {self.tp_rank}")

    def keys(self, seq_hashes: list[int]) -> list[BlockKey]:
        ns, fp, rank = self.namespace, self.fingerprint, self.tp_rank
        return [_new(BlockKey, (ns, fp, rank, h)) for h in seq_hashes]
