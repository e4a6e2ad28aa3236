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
    server does (transport/peer_rpc.py), and hands each pin back once."""

    fingerprints: frozenset[int]
    arena_size: int

    def prepare_read(self, keys: list[bytes]) -> list[PinnedBlock]:
        """Pin the longest held prefix of `keys` in the host arena (staging disk
        blocks first), with each block's checksum: one pin per block returned."""
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


class LocationOwner(Protocol):
    """The owner's side of a sharded index (discovery/sharded.py implements
    it): which peers hold the keys this node owns. Tiers travel as their
    names ("host", "disk"; None: no longer held); the owner checks them."""

    def place(self, node: str, session: int, keys: list[bytes], tiers: list[str | None]) -> bool:
        """`node`, in `session` (the etcd lease of its record), holds `keys`
        in `tiers` now; False: not the session the owner sees for it."""
        ...

    def holders(self, keys: list[bytes], asker: str) -> list[dict[str, str]]:
        """For each key: node -> tier name (`asker`: the peer asking)."""
        ...
