"""Block identity: the one hashing function every node and every version must share.

Version 2. A block's sequence hash is 128 bits of keyed BLAKE2b, chained:

    h(-1) = BLAKE2b-128[K, "kvbm-seed-v2"](lp(model) lp(adapter) lp(cache salt))
    h(i)  = BLAKE2b-128[K, "kvbm-block-v2"](h(i-1) lp(extras of block i) tokens of block i)

where K is the fleet's hashing key, lp(x) is x prefixed by its length (u32
little-endian), a hash is 16 little-endian bytes, and tokens are u32
little-endian. So a sequence hash names a block *and* everything before it:
its request's model, adapter and cache salt, every token, and whatever else
shapes its KV that the engine names as the block's extras (the multimodal
features overlapping it, the prompt-embedding bytes of its positions).

Why keyed: a block key must not be forgeable by whoever chooses prompts. With
a public function (version 1 was xxh3-64 under a public seed) two different
32-token blocks with one key were found in CPU minutes, and a second tenant
loaded the first's KV. Under a key the attacker lacks, no collision can be
searched offline, and a key read from etcd or a peer's wire says nothing about
the prompt. 128 bits keep accidental collisions out of reach at any fleet's
scale (a fleet of 10**12 blocks: odds about 10**-15).

K is derived from the fleet secret by HKDF-SHA256 (`HashKey.derive`); engines
get K (never the secret) from their node at attach, with its id, which both
sides compare, so an engine never publishes keys no peer can find. Golden
vectors in tests/unit/golden/ pin the function under a fixed key: changing it splits
a fleet running two versions into two caches (hence `HASH_VERSION`).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import xxhash

HASH_VERSION = 2
HASH_BYTES = 16  # of a sequence hash
KEY_BYTES = 32  # of the hashing key
_MAX_TOKEN = 2**32 - 1
_LEN = struct.Struct("<I")
_SEED_PERSON = b"kvbm-seed-v2"
_BLOCK_PERSON = b"kvbm-block-v2"
_HKDF_SALT = b"kvbm block identity"
_HKDF_INFO = b"kvbm-block-key-v2"


@dataclass(frozen=True, slots=True)
class HashKey:
    """The fleet's block-hashing key and its public id (the first 8 bytes of
    a hash of it, which says nothing of the key). Its repr leaves the key out."""

    key: bytes = field(repr=False)
    key_id: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != KEY_BYTES:
            raise ValueError(f"a hashing key is {KEY_BYTES} bytes")
        expected = _key_id(self.key)
        if self.key_id == 0:
            object.__setattr__(self, "key_id", expected)
        elif self.key_id != expected:
            raise ValueError("the hashing key does not match its id")

    @classmethod
    def derive(cls, fleet_secret: bytes) -> HashKey:
        """HKDF-SHA256 (RFC 5869) of the fleet secret: every node of a fleet
        derives the same key, and the key does not give the secret back."""
        if not fleet_secret:
            raise ValueError("no fleet secret to derive a hashing key from")
        prk = hmac.new(_HKDF_SALT, fleet_secret, hashlib.sha256).digest()
        return cls(hmac.new(prk, _HKDF_INFO + b"\x01", hashlib.sha256).digest())


_DISK_SALT = b"kvbm disk tier"
_DISK_INFO = b"kvbm-disk-key-v1\x00"


def disk_key(secret: bytes, node_id: str) -> bytes:
    """The key that seals a node's disk tier file (kvbm/disk_seal.py):
    HKDF-SHA256 of the node's secret, bound to its id, so one node's file
    bytes do not check out under another's key, and the key does not give
    the secret back. Whoever lacks the secret cannot forge the file's sums."""
    if not secret:
        raise ValueError("no secret to derive a disk key from")
    prk = hmac.new(_DISK_SALT, secret, hashlib.sha256).digest()
    return hmac.new(prk, _DISK_INFO + node_id.encode() + b"\x01", hashlib.sha256).digest()


def _key_id(key: bytes) -> int:
    digest = hashlib.blake2b(key, digest_size=8, person=b"kvbm-key-id").digest()
    return int.from_bytes(digest, "little")


def _lp(part: str | bytes) -> bytes:
    raw = part.encode() if isinstance(part, str) else bytes(part)
    return _LEN.pack(len(raw)) + raw


class BlockHasher:
    """Sequence hashes under one key. Immutable once built; any thread may
    use it (each call copies the keyed state it starts from)."""

    def __init__(self, key: HashKey) -> None:
        self.key = key
        self._seed = hashlib.blake2b(digest_size=HASH_BYTES, key=key.key, person=_SEED_PERSON)
        self._block = hashlib.blake2b(digest_size=HASH_BYTES, key=key.key, person=_BLOCK_PERSON)

    def seed(self, model: str, adapter: str = "", cache_salt: str = "") -> int:
        """The hash before a request's first block: its model's identity (the
        checkpoint, not only its served name), its adapter's identity ("" for
        none) and its cache salt ("" for none)."""
        if not model:
            raise ValueError("a model identity must be a non-empty string")
        h = self._seed.copy()
        h.update(_lp(model) + _lp(adapter) + _lp(cache_salt))
        return int.from_bytes(h.digest(), "little")

    def sequence_hashes(
        self,
        token_ids: Sequence[int] | np.ndarray,
        block_size: int,
        parent: int,
        extras: Mapping[int, bytes] | None = None,
    ) -> list[int]:
        """Sequence hashes of every *full* block of `token_ids` (a partial tail
        has none). `parent` is the hash just before `token_ids[0]`: a request's
        seed for its first block, else its last block's hash, so a request is
        hashed as it grows. `extras[i]`: what else shapes the KV of the i-th
        block of this call (absent: nothing)."""
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if not 0 <= parent < 2 ** (8 * HASH_BYTES):
            raise ValueError("parent is not a sequence hash")
        tokens = np.asarray(token_ids)
        if tokens.ndim != 1:
            raise ValueError("token_ids must be one-dimensional")
        if tokens.size and (
            tokens.dtype.kind not in "iu" or tokens.min() < 0 or tokens.max() > _MAX_TOKEN
        ):
            raise ValueError("token ids must be integers in [0, 2**32)")
        n_full = tokens.size // block_size
        data = tokens[: n_full * block_size].astype("<u4").tobytes()
        step = block_size * 4
        extras = extras or {}
        base, out = self._block, []
        prev = parent.to_bytes(HASH_BYTES, "little")
        for i in range(n_full):
            h = base.copy()
            h.update(prev + _lp(extras.get(i, b"")) + data[i * step : (i + 1) * step])
            prev = h.digest()
            out.append(int.from_bytes(prev, "little"))
        return out


def checksum(data: memoryview | bytes) -> int:
    """Content checksum of one block's bytes (xxh3_64; releases the GIL). It
    guards bytes against corruption on disk and in transit; identity is the
    key's job, above."""
    return xxhash.xxh3_64_intdigest(data)


def content_matches(data: memoryview | bytes, expected: int) -> bool:
    """Whether a block's bytes are the ones its checksum was taken of."""
    return checksum(data) == expected


# How the tiers check bytes that come back from disk or from a peer. The
# node's builder passes `content_matches`; only a test passes anything else.
Verify = Callable[[memoryview, int], bool]
