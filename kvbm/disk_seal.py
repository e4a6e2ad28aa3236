"""The disk tier's keyed sums: whoever can read the node's disk file, or
could write it while the node was stopped, cannot make the node serve a byte
it did not write.

All under the node's disk key K (`disk_key` in kvbm/hashing.py, from the
node's secret and id):

- the superblock and each slot header end in BLAKE2b-128 keyed by K. A
  header names its block's key, content checksum and group anchor, and the
  seal of its data; a file written under another key (the secret was
  rotated, or another node's file) checks out nowhere;
- a slot's data is sealed by GMAC (AES-256-GCM with no plaintext and the
  block as associated data) under a one-time key BLAKE2b(K, nonce), the
  nonce 16 random bytes drawn at each write and kept in the header.

Why the data is keyed too: a keyed header over an unkeyed data sum is not
enough, as second preimages of xxh3 are feasible (whoever writes the file
would swap in other bytes of the same sum). Why GMAC under a one-time key
rather than a keyed hash of the block: every block read from disk is checked,
and GHASH runs at several GB/s a core with AES-NI (keyed BLAKE2b about
0.5 GB/s, HMAC-SHA256 about 1.4 on the same core), close to the disk's own
pace; a fresh key per write keeps GHASH's key out of reach (a repeated GCM
nonce under one key would give it away) with no counter to keep on disk.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
SUM_BYTES = 16  # of a superblock's or header's sum
NONCE_BYTES = 16
SEAL_BYTES = NONCE_BYTES + 16  # nonce, then the GMAC tag
_ZERO_IV = bytes(12)  # each one-time key seals one block: no IV to vary
SUPER, HEADER = b"kvbm-g3-super", b"kvbm-g3-head"  # what a sum is of
_DATA = b"kvbm-g3-data"


class DiskSeal:
    """The node's disk key and what it signs. Thread-safe (nothing mutable);
    its repr leaves the key out."""

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ValueError(f"a disk key is {KEY_BYTES} bytes")
        self._key = key

    def __repr__(self) -> str:
        return "DiskSeal(<key>)"

    def sum(self, what: bytes, data: bytes) -> bytes:
        """The keyed sum of a superblock or a header (`what`: SUPER or HEADER)."""
        return hashlib.blake2b(data, digest_size=SUM_BYTES, key=self._key, person=what).digest()

    def sum_ok(self, what: bytes, data: bytes, expected: bytes) -> bool:
        return hmac.compare_digest(self.sum(what, data), expected)

    def seal(self, data: memoryview) -> bytes:
        """A fresh nonce and the data's tag under it: what the header keeps."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._tag(nonce, data)

    def opens(self, data: memoryview, seal: bytes | memoryview) -> bool:
        """Whether `data` is the block this key sealed as `seal`."""
        nonce, tag = bytes(seal[:NONCE_BYTES]), bytes(seal[NONCE_BYTES:SEAL_BYTES])
        return hmac.compare_digest(self._tag(nonce, data), tag)

    def _tag(self, nonce: bytes, data: memoryview) -> bytes:
        once = hashlib.blake2b(nonce, digest_size=KEY_BYTES, key=self._key, person=_DATA)
        return AESGCM(once.digest()).encrypt(_ZERO_IV, b"", data)
