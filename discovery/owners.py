"""Which node owns which keys in a sharded index: places and rendezvous hashing.

A key sits in the index at its place (`places`): 64 bits, the top
SHARD_BITS its shard, the rest the low bits of its x (the key in 64 bits).
The shard is that of the key's anchor: the first key of its group, a run of
a prompt's keys that the engine names (kvbm: 16 positions). So a prompt's
keys sit at a few owners, and a lookup of 128 keys makes at most 8 or 9
calls, not one per owner in the fleet. A key with no anchor named is its
own.

A shard's owner is the live node with the highest score hash(node, shard):
every node computes the same owners from the same set of live nodes, with
no coordination, and a node that joins or leaves moves only the shards it
wins or held (about 1/N of them), so a change of the fleet costs the
publishers a resend of 1/N of what they hold, not all of it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import numpy as np
import xxhash

from discovery.key_split import HEAD_BYTES, first_words, first_words_of_rows, tail

# A key's x is its head's first word (discovery/key_split.py), xor a hash of
# its tail: a place needs no more, since the head is a keyed hash (uniform)
# and a place is advice that the holder's pin checks against the whole key.
SHARD_BITS = 12
SHARDS = 1 << SHARD_BITS
_SHIFT = np.uint64(64 - SHARD_BITS)
_LOW = np.uint64((1 << (64 - SHARD_BITS)) - 1)
_SHARD_IDS = np.arange(SHARDS, dtype=np.uint64)
_EMPTY = np.empty(0, np.uint64)


@functools.lru_cache(maxsize=1024)
def _tail_mix(tail: bytes) -> int:
    return xxhash.xxh3_64_intdigest(tail, seed=0x6B76626D)


def _heads_and_mixes(keys: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Each key's head (uint64) and the hash of its tail. A request's keys
    share one length and one tail: that case is one pass in numpy."""
    n, size = len(keys), len(keys[0])
    joined = b"".join(keys)
    if size >= HEAD_BYTES and len(joined) == n * size:
        rows = np.frombuffer(joined, np.uint8).reshape(n, size)
        if (rows[1:, HEAD_BYTES:] == rows[0, HEAD_BYTES:]).all():
            heads = first_words_of_rows(rows)
            return heads, np.full(n, _tail_mix(tail(keys[0])), np.uint64)
    heads = first_words(keys)
    return heads, np.fromiter((_tail_mix(tail(k)) for k in keys), np.uint64, n)


def places(keys: Sequence[bytes], anchors: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Each key's place (uint64 array): its anchor's shard, then the low bits
    of its x (the key in 64 bits: its head xor a hash of its tail).
    `anchors`: each key's anchor as the head it has (a block key's sequence
    hash; the anchor shares the key's tail); None, or 0 for a key: the key
    is its own. Two keys in one shard share a place with odds of 2**-52 per
    pair; an owner's answer is advice (the holder's pin checks the real
    key), so that costs at most one pin that finds nothing."""
    if not keys:
        return _EMPTY
    heads, mixes = _heads_and_mixes(keys)
    x = heads ^ mixes
    if anchors is None:
        ax = x
    else:
        a = np.asarray(anchors, np.uint64)
        ax = np.where(a == 0, x, a ^ mixes)
    return (shard_of(ax).astype(np.uint64) << _SHIFT) | (x & _LOW)


def shard_at(places: np.ndarray) -> np.ndarray:
    """Each place's shard."""
    return (places >> _SHIFT).astype(np.intp)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise (uint64 arithmetic wraps)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def shard_of(x: np.ndarray) -> np.ndarray:
    """The shard of each key whose x this is (uint64 array), mixed first:
    keys whose heads are not uniform (a bench's counters, say) still spread
    evenly."""
    with np.errstate(over="ignore"):
        return (_mix(x) >> _SHIFT).astype(np.intp)


class OwnerRing:
    """Invariant: `nodes` is sorted, and `owner[s]` is the index in `nodes` of
    shard s's owner (-1 for every shard while no node is live)."""

    def __init__(self, nodes: Iterable[str] = ()) -> None:
        self.nodes: tuple[str, ...] = tuple(sorted(set(nodes)))
        if not self.nodes:
            self.owner = np.full(SHARDS, -1, np.intp)
            return
        with np.errstate(over="ignore"):
            seeds = np.array([xxhash.xxh3_64_intdigest(n.encode()) for n in self.nodes], np.uint64)
            scores = _mix(seeds[:, None] ^ (_SHARD_IDS[None, :] * np.uint64(0x9E3779B97F4A7C15)))
        self.owner = scores.argmax(axis=0)

    def owners_of(self, places: np.ndarray) -> list[str]:
        """The owner of each place; [] while no node is live."""
        if not self.nodes:
            return []
        nodes = self.nodes
        return [nodes[i] for i in self.owner[shard_at(places)].tolist()]

    def shards_of(self, node: str) -> np.ndarray:
        """The shards `node` owns (a bool mask over SHARDS)."""
        if node not in self.nodes:
            return np.zeros(SHARDS, bool)
        return self.owner == self.nodes.index(node)

    def moved(self, before: OwnerRing) -> np.ndarray:
        """The shards whose owner is not the same node as in `before` (a bool mask)."""
        if not before.nodes or not self.nodes:
            return np.ones(SHARDS, bool)
        now = np.array(self.nodes, dtype=object)[self.owner]
        then = np.array(before.nodes, dtype=object)[before.owner]
        return now != then
