"""The node's keys, shared read-only with its engines: which blocks the node
could serve now (its own tiers, and its peers' as its index mirror shows
them), so that vLLM's scheduler learns of a miss, and of the length of a
hit, without a round trip to the node.

One shared-memory file beside the host arena, made of 8-way buckets of
64-bit words. A key's word is a salted 64-bit hash of the key with its low
three bits replaced by what the node holds of it (`LOCAL`, `REMOTE_HOST`,
`REMOTE_DISK`); zero is an empty way. A key whose bucket is full goes to the
writer's own overflow and sets its bucket's overflow byte: a reader that
does not find a key in such a bucket cannot say "no", and asks the node.

The view is advice, never the truth: a key the node has just let go may
still show (a load then pins less, and the engine recomputes the rest) and
a key shows only once its store has been committed. Bytes never come from
here: an engine loads only what the node pins.

Consistency: one writer at a time (a lock), and a sequence counter in the
header, odd while a batch of changes is being written; a reader that saw
it odd, or changed across its read, reads again (then asks the node). Each
word is written whole (an aligned 8-byte store); on x86-64 (stores and
loads kept in order) that makes every read a state the writer passed
through. Elsewhere (aarch64: no barriers can be had from numpy) a reader
does not trust the view and always asks the node.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import secrets
import struct
import threading
import time
from collections.abc import Sequence

import numpy as np

from discovery.key_split import first_words, tail
from kvbm.errors import ArenaError
from kvbm.shm_arena import SharedArena

LOCAL, REMOTE_HOST, REMOTE_DISK = 1, 2, 4
PEERS = REMOTE_HOST | REMOTE_DISK
BITS = 7
UNSURE = 8  # a reader's answer, never stored
WAYS = 8
MAGIC = 0x5745_4956_4D42_564B  # "KVBMVIEW"
VERSION = 1
HEADER = 64  # magic, version u32, log2(buckets) u32, salt, sequence, avoid, flags (u64s)
_HEAD = struct.Struct("<QIIQ")
_SEQ = 24 // 8  # the sequence counter's index among the header's words
_AVOID = 32 // 8  # CLOCK_MONOTONIC ns until which the node leaves some peer alone
_FLAGS = 40 // 8
# A flag: peers' keys are not in the view: not yet (a new view, until the
# node fills it from its index mirror) or never (a sharded index).
PEERS_ELSEWHERE = 1
READ_TRIES = 8
ORDERED_CPU = platform.machine().lower() in ("x86_64", "amd64")  # see the module docstring

_M1, _M2, _GOLDEN = (
    np.uint64(0xBF58476D1CE4E5B9),
    np.uint64(0x94D049BB133111EB),
    np.uint64(0x9E3779B97F4A7C15),
)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_KEEP = np.uint64(~BITS & (2**64 - 1))
_BITS, _ZERO = np.uint64(BITS), np.uint64(0)


def view_bytes(buckets: int) -> int:
    return HEADER + buckets * WAYS * 8 + buckets


def buckets_for(capacity: int) -> int:
    """A power of two with at most 3 keys per bucket on average at `capacity`
    keys: a bucket then overflows with a probability of about 0.4%."""
    need = max(64, -(-capacity // 3))
    return 1 << (need - 1).bit_length()


class _Layout:
    """The words of a mapped view (the writer's or a reader's)."""

    def __init__(self, arena: SharedArena) -> None:
        self.arena = arena
        raw = arena.array
        magic, version, log2, salt = _HEAD.unpack(bytes(raw[: _HEAD.size]))
        if magic != MAGIC or version != VERSION or not 6 <= log2 <= 40:
            raise ArenaError(f"{arena.name} is not a key view of version {VERSION}")
        buckets = 1 << log2
        if arena.size != view_bytes(buckets):
            raise ArenaError(f"key view {arena.name} is {arena.size} bytes, expected more")
        self.buckets = buckets
        self.shift = np.uint64(64 - log2)
        self.salt = np.uint64(salt)
        self.header = raw[:HEADER].view(np.uint64)
        end = HEADER + buckets * WAYS * 8
        self.words = raw[HEADER:end].view(np.uint64).reshape(buckets, WAYS)
        self.overflow = raw[end:]
        self._tails: dict[bytes, np.uint64] = {}

    def hashes(self, keys: Sequence[bytes]) -> np.ndarray:
        """Each key's salted 64-bit hash (splitmix64 over its head's first word,
        discovery/key_split.py, its tail folded in): keys that share a tail cost one
        numpy pass. The view is advice, so 64 bits of the keyed hash do."""
        heads = first_words(keys)
        shared = tail(keys[0])
        if all(tail(k) == shared for k in keys):
            x = heads ^ self._tail(shared)
        else:
            x = heads ^ np.array([self._tail(tail(k)) for k in keys], np.uint64)
        z = x + _GOLDEN
        z = (z ^ (z >> _S30)) * _M1
        z = (z ^ (z >> _S27)) * _M2
        return z ^ (z >> _S31)

    def _tail(self, tail: bytes) -> np.uint64:
        h = self._tails.get(tail)
        if h is None:
            if len(self._tails) > 64:
                self._tails.clear()
            digest = hashlib.blake2b(tail, digest_size=8).digest()
            h = self._tails[tail] = np.uint64(int.from_bytes(digest, "little")) ^ self.salt
        return h

    def close(self) -> None:
        """Drop every view of the mapping, then unmap it (for the node: unlink
        the name, and release the lock that tells engines it is alive)."""
        self.header = np.zeros(4, np.uint64)
        self.words = np.zeros((0, WAYS), np.uint64)
        self.overflow = np.zeros(0, np.uint8)
        self.arena.close()

    def place(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bucket and tag (the hash without its low bits, never zero) of each hash."""
        tags = h & _KEEP
        tags[tags == 0] = np.uint64(BITS + 1)
        return (h >> self.shift).astype(np.int64), tags


class KeyView:
    """The node's side. Invariants: a key has at most one word, in its
    bucket or in `_spill` (never both); a word's bits are never zero; a
    bucket's overflow byte is set exactly while `_spill` holds keys of it or
    it is `_lossy`. The spill holds at most `_spill_max` keys held only by
    peers (a fleet's mirror can hold far more keys than the view has room
    for): a peer's key past that is not kept, and its bucket is lossy until
    the peers' keys are all rebuilt (`unset_all`). The node's own keys are
    always kept."""

    def __init__(self, arena: SharedArena) -> None:
        self._lay = _Layout(arena)
        self._lock = threading.Lock()
        self._spill: dict[int, dict[int, int]] = {}  # bucket -> {tag: bits}
        self._spilled = 0  # keys in `_spill`
        self._spill_max = self._lay.buckets * WAYS // 16
        self._lossy: set[int] = set()
        self._words = memoryview(self._lay.words).cast("B").cast("Q")  # scalar access, fast
        self._seq = memoryview(self._lay.header).cast("B").cast("Q")

    @classmethod
    def create(
        cls, name: str, capacity: int, directory: str, mode: int = 0o600, gid: int | None = None
    ) -> KeyView:
        buckets = buckets_for(capacity)
        arena = SharedArena.create(name, view_bytes(buckets), mode, gid, directory)
        try:
            head = _HEAD.pack(MAGIC, VERSION, buckets.bit_length() - 1, secrets.randbits(64))
            arena.array[: _HEAD.size] = np.frombuffer(head, np.uint8)
            view = cls(arena)
            # Born without peers' keys: until the node has filled them in
            # (`peers_here`), a key not found may be a peer's, and readers
            # ask the node rather than hear "held nowhere" (a new node's
            # first requests would miss the fleet).
            view.peers_elsewhere()
            return view
        except BaseException:
            arena.close()
            raise

    @property
    def name(self) -> str:
        return self._lay.arena.name

    @property
    def size(self) -> int:
        return self._lay.arena.size

    def set(self, keys: Sequence[bytes], bit: int) -> None:
        """Mark `keys` as held in `bit`'s way."""
        if keys:
            self._change(keys, bit, True)

    def unset(self, keys: Sequence[bytes], bit: int) -> None:
        """Mark `keys` as no longer held in `bit`'s way; a key held nowhere leaves."""
        if keys:
            self._change(keys, bit, False)

    def unset_all(self, bit: int) -> None:
        """`bit` off for every key (the mirror was rebuilt): one numpy pass."""
        with self._lock:
            self._begin()
            try:
                words = self._lay.words
                kept = words & np.uint64(~bit & (2**64 - 1))
                kept[(kept & np.uint64(BITS)) == 0] = 0
                words[:] = kept
                moves: dict[int, int] = {}
                flags: dict[int, int] = {}
                for b, spilled in list(self._spill.items()):
                    for tag, bits in list(spilled.items()):
                        if bits & ~bit:
                            spilled[tag] = bits & ~bit
                        else:
                            del spilled[tag]
                            self._spilled -= 1
                    self._refill(b, moves, flags)
                if bit & PEERS == PEERS:  # what was not kept was a peer's: gone now
                    lossy, self._lossy = self._lossy, set()
                    for b in lossy:
                        if b not in self._spill:
                            flags[b] = 0
                self._write(moves, flags)
            finally:
                self._end()

    def avoid_peers_until(self, monotonic_s: float) -> None:
        """The node leaves some peer alone until then: readers cannot tell
        whose keys those are, so they ask the node about peers' keys."""
        with self._lock:
            self._seq[_AVOID] = max(self._seq[_AVOID], int(monotonic_s * 1e9))

    def peers_elsewhere(self) -> None:
        """The node's index keeps no mirror of its peers' keys (a sharded
        index): the view cannot say a key is held nowhere, only that the
        node holds it, so readers ask the node about the rest."""
        with self._lock:
            self._seq[_FLAGS] |= PEERS_ELSEWHERE

    def peers_here(self) -> None:
        """Peers' keys are in the view now (filled from the index mirror,
        which keeps it up to date from here on): a key not found is held
        nowhere the node knows of."""
        with self._lock:
            self._seq[_FLAGS] &= ~PEERS_ELSEWHERE & (2**64 - 1)

    def count(self) -> int:
        """Keys in the view (for tests and stats)."""
        with self._lock:
            return int(np.count_nonzero(self._lay.words)) + self._spilled

    def stats(self) -> dict[str, int]:
        """For `kvbm status`: how full the view is, and how many buckets
        make engines ask the node (spilled keys, peers' keys not kept)."""
        with self._lock:
            return {
                "keys": int(np.count_nonzero(self._lay.words)) + self._spilled,
                "ways": self._lay.buckets * WAYS,
                "spilled": self._spilled,
                "buckets_asking_the_node": int(np.count_nonzero(self._lay.overflow)),
            }

    def close(self) -> None:
        self._words.release()
        self._seq.release()
        self._lay.close()

    # -- internals ---------------------------------------------------------
    def _change(self, keys: Sequence[bytes], bit: int, on: bool) -> None:
        """Plan the batch's word and overflow-byte writes first, then make
        them between two turns of the sequence counter: readers wait (or
        ask the node) for microseconds, not for the planning's Python."""
        buckets, tags = self._lay.place(self._lay.hashes(keys))
        with self._lock:
            words: dict[int, int] = {}
            flags: dict[int, int] = {}
            one = self._set_one if on else self._unset_one
            for b, tag in zip(buckets.tolist(), tags.tolist(), strict=True):
                one(b, tag, bit, words, flags)
            if not words and not flags:
                return  # nothing changes: readers need not retry
            self._begin()
            try:
                self._write(words, flags)
            finally:
                self._end()

    def _write(self, words: dict[int, int], flags: dict[int, int]) -> None:
        w, o = self._words, self._lay.overflow
        for i, v in words.items():
            w[i] = v
        for b, v in flags.items():
            o[b] = v

    def _set_one(self, b: int, tag: int, bit: int, words: dict, flags: dict) -> None:
        w, base, free = self._words, b * WAYS, -1
        for i in range(base, base + WAYS):
            word = words.get(i, w[i])
            if word & ~BITS == tag:
                if word & bit != bit:  # already set (a tick re-telling what is held): no write
                    words[i] = word | bit
                return
            if word == 0 and free < 0:
                free = i
        spilled = self._spill.get(b)
        if spilled is not None and tag in spilled:
            spilled[tag] |= bit
        elif free >= 0:
            words[free] = tag | bit
        elif bit & LOCAL or self._spilled < self._spill_max:
            self._spill.setdefault(b, {})[tag] = bit
            self._spilled += 1
            flags[b] = 1
        else:
            self._lossy.add(b)
            flags[b] = 1

    def _unset_one(self, b: int, tag: int, bit: int, words: dict, flags: dict) -> None:
        w, base = self._words, b * WAYS
        for i in range(base, base + WAYS):
            word = words.get(i, w[i])
            if word & ~BITS == tag:
                if not word & bit:
                    return  # not set: no write
                left = word & ~bit & BITS
                words[i] = tag | left if left else 0
                if not left:
                    self._refill(b, words, flags)
                return
        spilled = self._spill.get(b)
        if spilled is not None and tag in spilled:
            left = spilled[tag] & ~bit
            if left:
                spilled[tag] = left
            else:
                del spilled[tag]
                self._spilled -= 1
                self._refill(b, words, flags)

    def _refill(self, b: int, words: dict, flags: dict) -> None:
        """Move spilled keys of bucket `b` into its free ways; clear its
        overflow byte once none is left."""
        spilled = self._spill.get(b)
        if spilled is None:
            return
        w, base = self._words, b * WAYS
        for i in range(base, base + WAYS):
            if not spilled:
                break
            if words.get(i, w[i]) == 0:
                tag, bits = spilled.popitem()
                self._spilled -= 1
                words[i] = tag | bits
        if not spilled:
            del self._spill[b]
            if b not in self._lossy:
                flags[b] = 0

    def _begin(self) -> None:
        self._seq[_SEQ] += 1  # odd: a batch is being written

    def _end(self) -> None:
        self._seq[_SEQ] += 1


class KeyViewReader:
    """An engine's read-only mapping of its node's view. A node holds an
    exclusive lock on its view's file while it lives (kvbm/shm_arena.py);
    the view of a node that is gone, stopped or killed, is frozen: `alive`
    says so, and the engine asks the node (which fails: it attaches again)."""

    def __init__(self, name: str, size: int, directory: str) -> None:
        self._lay = _Layout(SharedArena.attach(name, size, directory, writable=False))
        self.name = name
        try:
            self._fd = os.open(
                SharedArena.path_of(name, directory), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            )
        except OSError as e:
            self._lay.close()
            raise ArenaError(f"cannot open key view {name}: {e}") from e

    @classmethod
    def of(cls, view: KeyView) -> KeyViewReader:
        arena = view._lay.arena
        return cls(arena.name, arena.size, arena.directory)

    def alive(self) -> bool:
        if self._fd < 0:
            return False
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True  # the node holds its lock
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        return False

    def peers_avoided(self) -> bool:
        return time.monotonic_ns() < int(self._lay.header[_AVOID])

    def peers_elsewhere(self) -> bool:
        """Peers' keys are not in this view: only the node can say who else holds one."""
        return bool(int(self._lay.header[_FLAGS]) & PEERS_ELSEWHERE)

    def bits(self, keys: Sequence[bytes]) -> np.ndarray | None:
        """What the node holds of each key: LOCAL | REMOTE_HOST | REMOTE_DISK,
        0 for nothing, UNSURE where the view cannot tell (the key is not in
        its bucket, and the bucket overflowed); None when the writer was busy
        at every try. Where the view cannot tell, ask the node."""
        if not ORDERED_CPU:
            return None
        if not keys:
            return np.zeros(0, np.uint64)
        lay = self._lay
        buckets, tags = lay.place(lay.hashes(keys))
        header, words, overflow = lay.header, lay.words, lay.overflow
        for _ in range(READ_TRIES):
            seq = int(header[_SEQ])
            if seq & 1:
                os.sched_yield()
                continue
            rows = words[buckets]
            over = overflow[buckets]
            if int(header[_SEQ]) != seq:
                continue
            found = (rows & _KEEP) == tags[:, None]
            got = np.where(found, rows & _BITS, _ZERO).max(axis=1)
            got[(got == 0) & (over != 0)] = UNSURE
            return got
        return None

    def close(self) -> None:
        """Safe to call twice."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._lay.close()
