"""The block key and its one binary codec.

A key is (namespace, layout fingerprint, tp rank, sequence hash): two nodes
exchange a block only when all four agree. `transport` and `discovery` never
import this module; they carry keys as the bytes `encode` produces.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import NamedTuple

_HEAD = struct.Struct("<QQHB")  # seq_hash, fingerprint, tp_rank, len(namespace)
_NAMESPACE = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_ENCODED = _HEAD.size + 64


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
        ns = check_namespace(self.namespace).encode()
        try:
            return _HEAD.pack(self.seq_hash, self.fingerprint, self.tp_rank, len(ns)) + ns
        except struct.error as e:
            raise ValueError(f"block key field out of range: {e}") from None

    @classmethod
    def decode(cls, data: bytes | memoryview) -> BlockKey:
        """Inverse of `encode`; raises ValueError on anything it did not produce."""
        if len(data) < _HEAD.size:
            raise ValueError("block key too short")
        seq_hash, fingerprint, tp_rank, n = _HEAD.unpack_from(data)
        if len(data) != _HEAD.size + n:
            raise ValueError("block key length does not match its namespace length")
        namespace = bytes(data[_HEAD.size :]).decode("utf-8", errors="strict")
        return cls(check_namespace(namespace), fingerprint, tp_rank, seq_hash)


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
        return [BlockKey(ns, fp, rank, h) for h in seq_hashes]
