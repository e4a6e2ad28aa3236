"""Block identity: the one hashing function every node and every version must share.

A block's hash is xxh3_64 of its token ids as little-endian u32, seeded with the
salt hash. The sequence hash of block 0 is its block hash; the sequence hash of
block i > 0 is xxh3_64 of (sequence hash i-1, block hash i) packed as two
little-endian u64, with the same seed. So a sequence hash names a block *and*
everything before it. Golden vectors in tests/golden/ pin the function: changing
it would split a fleet running two versions into two caches.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

import numpy as np
import xxhash

_PAIR = struct.Struct("<QQ")
_MAX_TOKEN = 2**32 - 1


def salt_hash(model_id: str, lora_name: str | None = None, user_salt: str | None = None) -> int:
    """The seed for every block hash of one (model, LoRA, user salt)."""
    if not model_id:
        raise ValueError("model_id must be a non-empty string")
    parts = [
        b"kvbm-salt-v1",
        model_id.encode(),
        (lora_name or "").encode(),
        (user_salt or "").encode(),
    ]
    # Length prefixes keep ("ab", "c") and ("a", "bc") apart.
    payload = b"".join(struct.pack("<I", len(p)) + p for p in parts)
    return xxhash.xxh3_64_intdigest(payload)


def sequence_hashes(
    token_ids: Sequence[int] | np.ndarray,
    block_size: int,
    salt: int,
    parent: int | None = None,
) -> list[int]:
    """Sequence hashes of every *full* block of `token_ids` (a partial tail has none).

    `parent` is the sequence hash of the block just before `token_ids[0]`, so a
    request can be hashed incrementally as it grows.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    tokens = np.asarray(token_ids)
    if tokens.ndim != 1:
        raise ValueError("token_ids must be one-dimensional")
    if tokens.size and (
        tokens.dtype.kind not in "iu" or tokens.min() < 0 or tokens.max() > _MAX_TOKEN
    ):
        raise ValueError("token ids must be integers in [0, 2**32)")
    n_full = tokens.size // block_size
    data = memoryview(tokens[: n_full * block_size].astype("<u4").tobytes())
    step = block_size * 4
    out: list[int] = []
    prev = parent
    for i in range(n_full):
        h = xxhash.xxh3_64_intdigest(data[i * step : (i + 1) * step], seed=salt)
        prev = h if prev is None else xxhash.xxh3_64_intdigest(_PAIR.pack(prev, h), seed=salt)
        out.append(prev)
    return out


def checksum(data: memoryview | bytes) -> int:
    """Content checksum of one block's bytes (xxh3_64; releases the GIL)."""
    return xxhash.xxh3_64_intdigest(data)


def content_matches(data: memoryview | bytes, expected: int) -> bool:
    """Whether a block's bytes are the ones its checksum was taken of."""
    return checksum(data) == expected


# How the tiers check bytes that come back from disk or from a peer. The
# node's builder passes `content_matches`; only a test passes anything else.
Verify = Callable[[memoryview, int], bool]
