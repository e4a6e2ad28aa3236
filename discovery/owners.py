"""Which node owns which keys in a sharded index: rendezvous hashing.

The key space is cut into SHARDS by the top bits of a hash of a key's x
(owner_table.key_x). A
shard's owner is the live node with the highest score hash(node, shard):
every node computes the same owners from the same set of live nodes, with
no coordination, and a node that joins or leaves moves only the shards it
wins or held (about 1/N of them), so a change of the fleet costs the
publishers a resend of 1/N of what they hold, not all of it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import xxhash

SHARD_BITS = 12
SHARDS = 1 << SHARD_BITS
_SHIFT = np.uint64(64 - SHARD_BITS)
_SHARD_IDS = np.arange(SHARDS, dtype=np.uint64)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise (uint64 arithmetic wraps)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def shard_of(x: np.ndarray) -> np.ndarray:
    """Each key's shard, from its x (uint64 array), mixed first: keys whose
    heads are not uniform (a bench's counters, say) still spread evenly."""
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

    def owners_of(self, x: np.ndarray) -> list[str]:
        """The owner of each key (by x); [] while no node is live."""
        if not self.nodes:
            return []
        nodes = self.nodes
        return [nodes[i] for i in self.owner[shard_of(x)].tolist()]

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
