"""What the transport needs from a node's tiers, declared here so that `kvbm`
implements it and the transport never imports `kvbm`. Keys are the bytes of
`BlockKey.encode()`; offsets are byte offsets into the node's host arena."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class PinnedBlock:
    key: bytes
    offset: int
    length: int
    checksum: int


class BlockSource(Protocol):
    """The serving side. It keeps no record of who pinned what: the peer
    server does (transport/peer_rpc/server.py), and hands each pin back once."""

    fingerprints: frozenset[int]
    arena_size: int
    step_blocks: int  # the most blocks one pin takes (staging must find room in G2)

    def prepare_read(self, keys: list[bytes], ready_only: bool = False) -> list[PinnedBlock]:
        """Pin the longest held prefix of `keys` in the host arena (staging disk
        blocks first), with each block's checksum: one pin per block returned.
        `ready_only`: stop at the first block that would need I/O or a
        checksum taken now, so that an event loop may call it."""
        ...

    def complete_read(self, blocks: list[PinnedBlock]) -> None:
        """Release one pin of each block (as `prepare_read` returned it)."""
        ...


@dataclass
class Reservation:
    """Host arena offsets reserved for blocks about to arrive: (key, offset);
    `held`: the keys the sink holds already (no need to read them)."""

    entries: list[tuple[bytes, int]]
    token: object = None  # the sink's own record of the reservation
    held: frozenset[bytes] = frozenset()


class BlockSink(Protocol):
    """The pulling side."""

    block_bytes: int  # the length of every block (a peer's pin of another length is refused)

    def prepare_store(self, keys: list[bytes]) -> Reservation:
        """Offsets for the keys not held yet (a prefix of them, if the arena is
        short), in order, and which of the keys before any such cut are held."""
        ...

    def complete_store(self, reservation: Reservation, checksums: list[int] | None) -> list[bytes]:
        """Register the reserved blocks whose bytes match `checksums`, free the
        rest (all of them when `checksums` is None). Returns the keys registered."""
        ...
