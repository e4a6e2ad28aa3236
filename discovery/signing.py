"""Index values signed by the fleet: every value a node writes to etcd (its
record, each block location) carries a MAC under a key derived from the
fleet's shared secret, bound to the etcd key it is written under (namespace,
node id, block key). A node believes only values that check out: an etcd
writer without the secret can delete, but cannot forge or move a record or
a location (to redirect pulls, or to mark keys as held by someone else)."""

from __future__ import annotations

import hashlib
import hmac

TAG_BYTES = 16
_CONTEXT = b"kvbm-index-v1"


class IndexSigner:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the index key needs a secret of at least 16 bytes")
        # its own key, not the RPC's: a MAC of one never passes as the other's
        self._key = hmac.digest(secret, _CONTEXT, hashlib.sha256)

    def sign(self, path: bytes, value: bytes) -> bytes:
        return value + self._tag(path, value)

    def open(self, path: bytes, data: bytes) -> bytes:
        """The value signed under `path`; ValueError if unsigned or mis-signed."""
        value, tag = data[:-TAG_BYTES], data[-TAG_BYTES:]
        if len(data) < TAG_BYTES or not hmac.compare_digest(tag, self._tag(path, value)):
            raise ValueError("unsigned or mis-signed value")
        return value

    def _tag(self, path: bytes, value: bytes) -> bytes:
        msg = len(path).to_bytes(2, "big") + path + value
        return hmac.digest(self._key, msg, hashlib.sha256)[:TAG_BYTES]
