"""The block manager as the transport sees it: the `BlockSource` a peer pulls
from and the `BlockSink` pulled blocks land in (transport/tiers.py)."""

from __future__ import annotations

import threading

from kvbm.block_key import BlockKey
from kvbm.manager import BlockManager
from transport.tiers import PinnedBlock, Reservation


class ManagerTiers:
    """Invariant: `_pins[peer][key]` is the host slot pinned for that peer's
    read; every such pin is released exactly once, by `unpin_for_peer`."""

    def __init__(self, mgr: BlockManager) -> None:
        self.mgr = mgr
        self.fingerprints = frozenset({mgr.geometry.fingerprint})
        self.arena_size = mgr.host.arena.size
        self._pins: dict[str, dict[bytes, int]] = {}
        self._lock = threading.Lock()

    # -- BlockSource -------------------------------------------------------
    def pin_for_peer(self, peer: str, keys: list[bytes]) -> list[PinnedBlock]:
        wanted = []
        for k in keys:
            key = BlockKey.decode(k)
            if key.fingerprint not in self.fingerprints:
                break
            wanted.append(key)
        stride, size = self.mgr.geometry.slot_bytes, self.mgr.geometry.block_bytes
        out = []
        pinned = self.mgr.pin_prefix(wanted)
        with self._lock:
            held = self._pins.setdefault(peer, {})
            for key, slot, csum in pinned:
                raw = key.encode()
                if raw in held:  # already pinned for this peer: keep one pin
                    self.mgr.unpin([slot])
                    slot = held[raw]
                held[raw] = slot
                out.append(PinnedBlock(raw, slot * stride, size, csum))
        return out

    def unpin_for_peer(self, peer: str, keys: list[bytes]) -> None:
        with self._lock:
            held = self._pins.get(peer, {})
            slots = [held.pop(k) for k in keys if k in held]
            if not held:
                self._pins.pop(peer, None)
        self.mgr.unpin(slots)

    # -- BlockSink ---------------------------------------------------------
    def reserve(self, keys: list[bytes]) -> Reservation:
        plan = self.mgr.prepare_store([BlockKey.decode(k) for k in keys])
        stride = self.mgr.geometry.slot_bytes
        entries = [(k.encode(), s * stride) for k, s in zip(plan.keys, plan.slots, strict=True)]
        reserved = set(plan.positions)
        end = len(keys) if plan.cut is None else plan.cut
        held = frozenset(keys[i] for i in range(end) if i not in reserved)
        return Reservation(entries, plan, held)

    def commit(self, reservation: Reservation, checksums: list[int] | None) -> list[bytes]:
        return [k.encode() for k in self.mgr.commit_verified(reservation.token, checksums)]
