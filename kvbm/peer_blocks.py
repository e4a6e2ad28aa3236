"""The block manager as the transport sees it: the `BlockSource` a peer pulls
from and the `BlockSink` pulled blocks land in (transport/block_ports.py)."""

from __future__ import annotations

import copy
from collections.abc import Mapping

from kvbm.block_key import BlockKey, parse_key
from kvbm.manager import BlockManager
from transport.block_ports import PinnedBlock, Reservation


class ManagerBlocks:
    """Stateless over the manager: the peer server records who holds which
    pin (transport/peer_rpc/server.py); a pin is handed back here by its offset."""

    def __init__(self, mgr: BlockManager) -> None:
        self.mgr = mgr
        self.anchors: Mapping[bytes, int] = {}  # of the keys pulled into this sink
        self.fingerprints = frozenset({mgr.geometry.fingerprint})
        self.arena_size = mgr.host.arena.size
        self.step_blocks = mgr.max_load_blocks
        self._stride = mgr.geometry.slot_bytes
        self.block_bytes = mgr.geometry.block_bytes

    # -- BlockSource -------------------------------------------------------
    def prepare_read(self, keys: list[bytes], ready_only: bool = False) -> list[PinnedBlock]:
        wanted: list[BlockKey] = []
        for k in keys:
            if parse_key(k).fingerprint not in self.fingerprints:  # ValueError: not a key
                break
            wanted.append(BlockKey(k))
        size = self.mgr.geometry.block_bytes
        return [
            PinnedBlock(key, slot * self._stride, size, csum)
            for key, slot, csum in self.mgr.prepare_peer_read(wanted, ready_only)
        ]

    def complete_read(self, blocks: list[PinnedBlock]) -> None:
        self.mgr.complete_peer_read([b.offset // self._stride for b in blocks])

    # -- BlockSink ---------------------------------------------------------
    def landing(self, anchors: Mapping[bytes, int]) -> ManagerBlocks:
        """This sink for one pull whose keys' group anchors are these: the
        blocks keep them (a sharded index places them by them)."""
        sink = copy.copy(self)
        sink.anchors = anchors
        return sink

    def prepare_store(self, keys: list[bytes]) -> Reservation:
        anchors = [self.anchors.get(k, 0) for k in keys] if self.anchors else None
        plan = self.mgr.prepare_store(keys, anchors)  # the puller's own keys: it asked for them
        stride = self._stride
        entries = [(k, s * stride) for k, s in zip(plan.keys, plan.slots, strict=True)]
        reserved = set(plan.positions)
        end = len(keys) if plan.cut is None else plan.cut
        held = frozenset(keys[i] for i in range(end) if i not in reserved)
        return Reservation(entries, plan, held)

    def complete_store(self, reservation: Reservation, checksums: list[int] | None) -> list[bytes]:
        return self.mgr.complete_pull(reservation.token, checksums)
