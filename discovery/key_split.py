"""A block key's two parts, as every package reads them: its head, then its tail.

A key is bytes. Its first `HEAD_BYTES` are its head: a block key's sequence
hash (a keyed 128-bit hash, kvbm/hashing.py), little-endian. The rest is its
tail (layout fingerprint, rank, namespace), which a request's keys share.
The head's first `WORD_BYTES` (a little-endian u64, the head's first word)
is what places a key: shards and owners (discovery/owners.py), the shared
key view (kvbm/key_view.py), the key table's buckets (discovery/keytable.py)
and a group's anchor (kvbm/block_key.py). Those are advice that a pin checks
against the whole key, and 64 bits of a keyed hash place as well as 128.

kvbm/block_key.py writes keys to this split and discovery reads keys by it;
tests/test_block_key.py checks that the two agree. The split lives here, in
the lowest package that reads a key's parts, because discovery may not import
kvbm (tests/test_package_layout.py); the transport sees a key as bytes only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HEAD_BYTES = 16
WORD_BYTES = 8
_WORD_MASK = (1 << (8 * WORD_BYTES)) - 1


def head_of(value: int) -> bytes:
    """A head's bytes from its value (a sequence hash); OverflowError past
    HEAD_BYTES, AttributeError for a non-int."""
    return value.to_bytes(HEAD_BYTES, "little")


def head_value(key: bytes) -> int:
    """The value of a key's head (a block key's sequence hash)."""
    return int.from_bytes(key[:HEAD_BYTES], "little")


def tail(key: bytes) -> bytes:
    """Everything after a key's head: the part a request's keys share."""
    return key[HEAD_BYTES:]


def first_word(value: int) -> int:
    """The first word of a head given as its value: what places its key."""
    return value & _WORD_MASK


def first_words(keys: Sequence[bytes]) -> np.ndarray:
    """Each key's first word (uint64), a key shorter than a word zero-padded."""
    joined = b"".join([k[:WORD_BYTES].ljust(WORD_BYTES, b"\0") for k in keys])
    return np.frombuffer(joined, "<u8").astype(np.uint64, copy=False)


def first_words_of_rows(rows: np.ndarray) -> np.ndarray:
    """The first word of each row of a 2-D uint8 array of equal-length keys."""
    return rows[:, :WORD_BYTES].copy().view("<u8").ravel().astype(np.uint64, copy=False)
