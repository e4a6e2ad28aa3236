"""Index values signed by the fleet: every value a node writes to etcd (its
record, each run of block locations) carries a MAC under a key derived from
the fleet's shared secret, over the etcd key it is written under, the lease
it is written under, the node's session nonce (random, one per start), a
stamp (the node's wall clock in ms, rising through a session) and how long
the value stays good after its stamp.

A node believes only values that check out: an etcd writer without the
secret can delete, but cannot forge a value, move it to another key, or put
a copy back under a lease of its own (etcd tells every reader the lease of
each key it sends). A copy put back under the same lease id (etcd lets a
client grant a chosen id once the old lease expired) still carries its old
stamp: a node record is believed only while its stamp is younger than its
validity (discovery/liveness.py), so what a dead node wrote is not believed
again, and a run only with the record of its own session."""

from __future__ import annotations

import hashlib
import hmac
import struct
import time
from dataclasses import dataclass

TAG_BYTES = 16
NONCE_BYTES = 16
# Wall clocks of the fleet's nodes may differ this much (NTP keeps them far
# closer): a record is believed this much past its validity, and refused
# when stamped further ahead than this.
CLOCK_SKEW_MS = 2000
_CONTEXT = b"kvbm-index-v2"
_HEAD = struct.Struct(">16sQI")  # nonce, stamp (ms), valid (ms after the stamp; 0: its session)
_LEASE = struct.Struct(">q")
NO_NONCE = bytes(NONCE_BYTES)


@dataclass(frozen=True, slots=True)
class Signed:
    """A value that checked out, with what it was signed with."""

    value: bytes
    lease: int
    nonce: bytes
    stamp: int  # ms, the writer's wall clock
    valid: int  # ms after `stamp` it is good for (0: as long as its session)

    @property
    def session(self) -> tuple[int, bytes]:
        return self.lease, self.nonce

    def fresh(self, now_ms: int | None = None) -> bool:
        """Whether a value with a validity is within it (clocks allowed to
        differ by CLOCK_SKEW_MS); one without (valid 0) always is."""
        if not self.valid:
            return True
        now = wall_ms() if now_ms is None else now_ms
        return self.stamp - CLOCK_SKEW_MS <= now <= self.stamp + self.valid + CLOCK_SKEW_MS


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class IndexSigner:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the index key needs a secret of at least 16 bytes")
        # its own key, not the RPC's: a MAC of one never passes as the other's
        self._key = hmac.digest(secret, _CONTEXT, hashlib.sha256)

    def sign(
        self,
        path: bytes,
        value: bytes,
        lease: int = 0,
        nonce: bytes = NO_NONCE,
        stamp: int = 0,
        valid: int = 0,
    ) -> bytes:
        """`value` as written under `path` and `lease`, in session `nonce`."""
        head = _HEAD.pack(nonce, stamp, valid)
        return value + head + self._tag(path, lease, head, value)

    def open(self, path: bytes, data: bytes, lease: int = 0) -> Signed:
        """The value signed under `path` and `lease` (the lease etcd says the
        key is under); ValueError if unsigned, mis-signed, or moved."""
        size = _HEAD.size + TAG_BYTES
        if len(data) < size:
            raise ValueError("unsigned or mis-signed value")
        value, head, tag = data[:-size], data[-size:-TAG_BYTES], data[-TAG_BYTES:]
        if not hmac.compare_digest(tag, self._tag(path, lease, head, value)):
            raise ValueError("unsigned or mis-signed value")
        nonce, stamp, valid = _HEAD.unpack(head)
        return Signed(value, lease, nonce, stamp, valid)

    def _tag(self, path: bytes, lease: int, head: bytes, value: bytes) -> bytes:
        msg = len(path).to_bytes(2, "big") + path + _LEASE.pack(lease) + head + value
        return hmac.digest(self._key, msg, hashlib.sha256)[:TAG_BYTES]
