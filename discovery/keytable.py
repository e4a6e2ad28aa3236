"""A compact hash table from opaque byte keys to small ints, with a batch
lookup that follows runs of keys stored in the order they arrived.

Why not a dict: a mirror of a fleet's index holds millions of keys, and a
lookup asks for a prompt's 128 block keys at once. A dict probe is a chain of
dependent cache misses (index slot -> entry -> the stored bytes object for the
equality test), 128 of them one after another: ~60 us against a million keys
on a cold cache, and ~110 bytes of heap per key. Batching random reads helps
less than one would hope on this machine (128 random rows of a 32 MB numpy
array cost 25-40 us with cold caches, even as one `take`), so the common case
avoids them altogether.

A key is stored exactly: its head (discovery/key_split.py: a block key's
sequence hash, kvbm/hashing.py) is kept as `x`, its first word xor a
per-tail random mix, and `y`, its second word; its tail (the rest: fingerprint, rank,
namespace, shared by almost every key of a mirror) as an interned id. The
head is a keyed hash, so x alone is uniform: it finds a key's bucket and
entry, and y is compared only at the entry (two keys of one x are as rare
as 64-bit collisions, and are told apart all the same). Two structures
hold it:

- the entries, in insertion order: `(x, y, tail id << 32 | value)`, 24
  bytes; a removed key leaves a hole (all words 0) until the next
  compaction. A node publishes a prompt's blocks in order and the etcd watch
  delivers them in order, so a prompt's keys sit next to each other here,
  and the lookup of a prompt (`find(..., prefix=True)`) compares them (x and
  y) with the entries after its first key in one numpy operation: one random
  read per run of consecutively stored keys, not one per key.
- the table: buckets of 8 slots `(x, entry position + 1 << 32 | tail id << 24
  | value)`, 128 bytes (two adjacent cache lines), so one random read finds a
  key's x, its value and its entry (where y is checked). A key lives in
  bucket `hash(x)`, or in a small dict (the stash) when that is full or the
  key does not fit a slot (x == 0, the empty-slot pattern; a tail id past 255
  or a value past 2**24). No probe chains, no tombstones; the table doubles
  when half full. It finds the first key of each run, serves single-key
  operations, and probes the rest of a batch whose keys are not stored in
  order all at once: gather every key's bucket, compare. (A mirror read back
  from etcd by a range read is such a case: keys written in one transaction
  come back in key order.)

Single writer; a lookup reads one consistent set of arrays.
"""

from __future__ import annotations

import functools
import random
import sys
from collections.abc import Iterator, Sequence

import numpy as np

# A key's head is its first HEAD bytes, two words: x (the first), then y.
from discovery.key_split import HEAD_BYTES as HEAD
from discovery.key_split import WORD_BYTES as WORD

_B = 8  # slots per bucket: 8 x (x, word) = 128 bytes, two adjacent cache lines
_LOG_B = 3
_MIN_BUCKETS = 16
_MIN_ENTRIES = 64
_MULT = 0x9E3779B97F4A7C15  # odd 64-bit constant: multiplicative (Fibonacci) hashing
_MULT_NP = np.uint64(_MULT)
_MASK64 = (1 << 64) - 1
_LOW32 = 0xFFFFFFFF
_SLOT_VALUE = (1 << 24) - 1  # the largest value a table slot holds (the stash takes any)
_SLOT_TAIL = 0xFF  # the largest tail id a table slot holds
_NO_TAIL = 0xFFFFFFFF  # a tail id never assigned: matches nothing
# Runs followed through the entries; past that many, or after a run shorter
# than _LONG_RUN, the batch looks scattered and the rest goes through the table.
_RUNS = 4
_LONG_RUN = 16
# halves of a uint64 viewed as two uint32, in memory order
_LO, _HI = (0, 1) if sys.byteorder == "little" else (1, 0)

# What follows a key's head; for a key shorter than HEAD bytes, its length
# (the head is then the key zero-padded), so it never equals a longer key.
Tail = bytes | int
# (key, x, y, tail id or 0: no key has this tail, entry position or -1,
#  table slot's first word or -1 (stashed or missing), tail, value or -1,
#  for a missing key: a free slot's first word in its bucket or -1)
_Probe = tuple[bytes, int, int, int, int, int, Tail, int, int]
_W = 3  # words of an entry: x, y, aux


class KeyTable:
    """bytes -> int in [0, 2**32). Single writer; see the module docstring."""

    def __init__(self) -> None:
        self.clear()

    # -- storage -------------------------------------------------------------
    def clear(self) -> None:
        self._count = 0  # live keys
        self._used = 0  # entries written, holes included
        self._last: _Probe | None = None
        self._stash: dict[tuple[int, int, int], int] = {}  # (x, y, tail id) -> entry position
        self._tail_ids: dict[Tail, int] = {}
        self._tails: list[Tail | None] = [None]  # id 0 is never used: empty slots read 0
        self._mix: list[int] = [0]
        self._tail_refs: list[int] = [0]
        self._free_tails: list[int] = []
        self._set_entries(np.zeros((_MIN_ENTRIES, _W), np.uint64))
        self._set_table(_MIN_BUCKETS)

    def _set_entries(self, ent: np.ndarray) -> None:
        self._ent = ent
        # Scalar access for get/set/pop: a memoryview indexes ~5x faster than numpy.
        self._mve = memoryview(ent).cast("B").cast("Q")
        # Column views for runs, made once: a lookup slices them, no more.
        self._ent_x = ent[:, 0]
        self._ent_y = ent[:, 1]
        # flat, for gathers: `take` on a strided column would copy it whole first
        self._ent_words = ent.reshape(-1)
        self._ent_tail = ent.view(np.uint32)[:, 4 + _HI]
        self._ent_value = ent.view(np.uint32)[:, 4 + _LO]

    def _set_table(self, buckets: int) -> None:
        self._tab = np.zeros((buckets, _B, 2), np.uint64)  # [..., 0] x, [..., 1] _word()
        self._mvt = memoryview(self._tab).cast("B").cast("Q")
        self._shift = 64 - (buckets.bit_length() - 1)
        self._shift_np = np.uint64(self._shift)
        self._grow_at = buckets * _B // 2
        self._shrink_at = buckets * _B // 16 if buckets > _MIN_BUCKETS else -1

    def _rebuild(self, buckets: int, compact: bool) -> None:
        """A new table of `buckets` buckets for every live entry, all at once:
        sort by bucket, rank within it, scatter; what does not fit goes to the
        stash. With `compact`, the entries lose their holes first (their order
        kept) and the entry array is sized to twice the live count. For
        shrinking and for a crowded stash; growth and compaction have cheaper
        ways (`_grow`, `_compact`)."""
        self._last = None
        ent = self._ent[: self._used]
        pos = (ent[:, 2] != 0).nonzero()[0]
        if compact:
            live = _rows(ent)[pos].view(np.uint64).reshape(-1, _W)
            fresh = np.zeros((max(_MIN_ENTRIES, 2 * len(live)), _W), np.uint64)
            fresh[: len(live)] = live
            self._set_entries(fresh)
            self._used = len(live)
            pos = np.arange(len(live))
            xs, ys, auxs = live[:, 0], live[:, 1], live[:, 2]
        else:
            xs, ys, auxs = ent[pos, 0], ent[pos, 1], ent[pos, 2]
        self._set_table(buckets)
        tails, values = auxs >> np.uint64(32), auxs & np.uint64(_LOW32)
        fits = (xs != 0) & (tails <= _SLOT_TAIL) & (values <= _SLOT_VALUE)
        b = ((xs * _MULT_NP) >> self._shift_np).astype(np.int64)
        order = np.argsort(b * 2 + ~fits)  # by bucket, keys that fit a slot first
        b, xs, ys, tails, values, pos, fits = (
            a[order] for a in (b, xs, ys, tails, values, pos, fits)
        )
        rank = np.arange(len(b)) - np.searchsorted(b, b)
        fit = (rank < _B) & fits
        words = self._tab.reshape(-1)
        at = (b[fit] * _B + rank[fit]) * 2
        words[at] = xs[fit]
        words[at + 1] = (
            (pos[fit].astype(np.uint64) + np.uint64(1)) << np.uint64(32)
            | tails[fit] << np.uint64(24)
            | values[fit]
        )
        rest = ~fit
        self._stash = dict(
            zip(
                zip(xs[rest].tolist(), ys[rest].tolist(), tails[rest].tolist(), strict=True),
                pos[rest].tolist(),
                strict=True,
            )
        )

    def _grow(self) -> None:
        """Double the table without sorting: the bucket index is the top bits
        of one hash, so bucket i splits into 2i and 2i + 1 by the next bit,
        and each half of its 8 slots fits. A slot's rank in its new bucket is
        a prefix count over its old bucket's 8 slots, done 8 bytes at a time
        (one multiply by 0x0101..01). Stashed keys get another chance."""
        self._last = None
        old, stash = self._tab.reshape(-1, 2), self._stash
        self._set_table(2 * len(self._tab))
        occupied = old[:, 1] != 0
        high = (((old[:, 0] * _MULT_NP) >> self._shift_np) & np.uint64(1)).astype(np.bool_)
        high &= occupied
        low = occupied & ~high
        rank = np.where(high, _prefix_counts(high), _prefix_counts(low)).astype(np.int64) - 1
        src = occupied.nonzero()[0]
        dst = (((src >> _LOG_B) * 2 + high[src]) << _LOG_B) + rank[src]
        _pairs(self._tab)[dst] = _pairs(old)[src]
        self._stash = {}
        for (x, y, t), pos in stash.items():
            self._place(x, y, t, pos, self._mve[_W * pos + 2] & _LOW32)

    def _compact(self) -> None:
        """Squeeze the holes out of the entries, their order kept; table slots
        and stash follow their entries to the new positions."""
        self._last = None
        ent = self._ent[: self._used]
        live = ent[:, 2] != 0
        moved_to = np.cumsum(live) - 1  # an entry's new position, by old position
        kept = int(moved_to[-1]) + 1 if len(moved_to) else 0  # `set` counts its new key already
        fresh = np.zeros((max(_MIN_ENTRIES, 2 * kept), _W), np.uint64)
        _rows(fresh)[:kept] = _rows(ent)[live]
        words = self._tab.reshape(-1, 2)[:, 1]  # a view: written through
        slots = (words != 0).nonzero()[0]
        w = words[slots]
        old_pos = (w >> np.uint64(32)).astype(np.int64) - 1
        words[slots] = (moved_to[old_pos] + 1).astype(np.uint64) << np.uint64(32) | (
            w & np.uint64(_LOW32)
        )
        self._stash = {k: int(moved_to[p]) for k, p in self._stash.items()}
        self._set_entries(fresh)
        self._used = kept

    def _place(self, x: int, y: int, t: int, pos: int, value: int) -> bool:
        """Give the key of entry `pos` a slot in its bucket (True), or the
        stash when the bucket is full or the key does not fit a slot."""
        base = (((x * _MULT) & _MASK64) >> self._shift) << (_LOG_B + 1)
        words = self._mvt[base + 1 : base + 2 * _B : 2].tolist()
        if x and t <= _SLOT_TAIL and value <= _SLOT_VALUE and 0 in words:
            slot = base + 2 * words.index(0)
            self._mvt[slot] = x
            self._mvt[slot + 1] = _word(pos, t, value)
            return True
        self._stash[x, y, t] = pos
        return False

    # -- tails ---------------------------------------------------------------
    def _tail_id(self, tail: Tail) -> int:
        """The id of `tail`, interned on first use (its count of keys is 0 then)."""
        t = self._tail_ids.get(tail)
        if t is None:
            if self._free_tails:
                t = self._free_tails.pop()
                self._tails[t], self._tail_refs[t] = tail, 0
            else:
                t = len(self._tails)
                self._tails.append(tail)
                self._mix.append(0)
                self._tail_refs.append(0)
            # The first tail of a table mixes with 0, so the common one-tail
            # lookup skips an xor; every other tail gets random bits, which
            # send one head under several tails (tensor-parallel ranks of a
            # block) to different buckets.
            self._mix[t] = random.getrandbits(64) if self._tail_ids else 0
            self._tail_ids[tail] = t
        return t

    def _release_tail(self, t: int) -> None:
        self._tail_refs[t] -= 1
        if not self._tail_refs[t]:
            del self._tail_ids[self._tails[t]]
            self._tails[t] = None
            self._free_tails.append(t)

    def _key(self, x: int, y: int, t: int) -> bytes:
        tail = self._tails[t]
        head = (x ^ self._mix[t]).to_bytes(WORD, "little") + y.to_bytes(WORD, "little")
        return head[:tail] if isinstance(tail, int) else head + tail

    # -- scalar operations -----------------------------------------------------
    def _probe(self, key: bytes) -> _Probe:
        """Where `key` is (see `_Probe`). Remembered until the next change, so
        a `get` followed by a `set` or `pop` of the same key object (what the
        mirror does for every event) probes once."""
        head, y, tail = _split(key)
        t = self._tail_ids.get(tail, 0)
        if not t:
            probe = self._last = (key, 0, y, 0, -1, -1, tail, -1, -1)
            return probe
        x = head ^ self._mix[t]
        base = (((x * _MULT) & _MASK64) >> self._shift) << (_LOG_B + 1)
        xs = self._mvt[base : base + 2 * _B : 2].tolist()
        pos = slot = value = -1
        i = xs.index(x) if x in xs else -1
        while i >= 0:
            word = self._mvt[base + 2 * i + 1]
            at = (word >> 32) - 1
            if (word >> 24) & _SLOT_TAIL == t and self._mve[_W * at + 1] == y:
                slot, pos, value = base + 2 * i, at, word & _SLOT_VALUE
                break
            # the same x under another tail or y: look on
            i = xs.index(x, i + 1) if x in xs[i + 1 :] else -1
        free = -1
        if slot < 0:
            if self._stash:
                pos = self._stash.get((x, y, t), -1)
                if pos >= 0:
                    value = self._mve[_W * pos + 2] & _LOW32
            if 0 in xs:  # no key with x == 0 has a slot: x == 0 is an empty slot
                free = base + 2 * xs.index(0)
        probe = self._last = (key, x, y, t, pos, slot, tail, value, free)
        return probe

    def _position(self, key: bytes) -> int:
        """`key`'s entry position or -1: `_probe` for a lookup, less its
        bookkeeping."""
        head, y, tail = _split(key)
        t = self._tail_ids.get(tail, 0)
        if not t:
            return -1
        x = head ^ self._mix[t]
        base = (((x * _MULT) & _MASK64) >> self._shift) << (_LOG_B + 1)
        xs = self._mvt[base : base + 2 * _B : 2].tolist()
        if x in xs:
            word = self._mvt[base + 2 * xs.index(x) + 1]
            at = (word >> 32) - 1
            if (word >> 24) & _SLOT_TAIL == t and self._mve[_W * at + 1] == y:
                return at
            return self._probe(key)[4]  # the same x under another tail or y: the long way
        return self._stash.get((x, y, t), -1) if self._stash else -1

    def _reprobe(self, key: bytes) -> _Probe:
        """`_probe`, reusing the remembered one; forgets it (the caller changes
        the table)."""
        last = self._last
        if last is None or last[0] is not key:
            last = self._probe(key)
        self._last = None
        return last

    def get(self, key: bytes, default: int | None = None) -> int | None:
        value = self._probe(key)[7]
        return default if value < 0 else value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self._probe(key)[4] >= 0

    def __len__(self) -> int:
        return self._count

    def set(self, key: bytes, value: int) -> None:
        """Insert (at the end of the entries) or overwrite (in place)."""
        if not 0 <= value <= _LOW32:
            raise ValueError(f"value out of range: {value}")
        _, x, y, t, pos, slot, tail, _, free = self._reprobe(key)
        if pos >= 0:
            self._mve[_W * pos + 2] = (t << 32) | value
            if slot >= 0:
                if value <= _SLOT_VALUE:
                    self._mvt[slot + 1] = _word(pos, t, value)
                else:  # too large for the slot: the key moves to the stash
                    self._mvt[slot] = self._mvt[slot + 1] = 0
                    self._stash[x, y, t] = pos
            return
        if not t:  # the first key with this tail
            t = self._tail_id(tail)
            x = _split(key)[0] ^ self._mix[t]
            free = -1
        self._count += 1
        self._tail_refs[t] += 1
        if self._used == len(self._ent):
            if self._used - self._count > self._count // 2:  # many holes: squeeze them out
                self._compact()
            else:
                bigger = np.zeros((2 * len(self._ent), _W), np.uint64)
                bigger[: self._used] = self._ent
                self._set_entries(bigger)
        if self._count > self._grow_at:
            self._grow()
            free = -1
        pos = self._used
        self._used += 1
        self._mve[_W * pos] = x
        self._mve[_W * pos + 1] = y
        self._mve[_W * pos + 2] = (t << 32) | value
        if free >= 0 and x and t <= _SLOT_TAIL and value <= _SLOT_VALUE:
            self._mvt[free] = x
            self._mvt[free + 1] = (pos + 1) << 32 | t << 24 | value
        elif (
            not self._place(x, y, t, pos, value)
            # A bucket overflows for ~1% of keys at half load; a stash far beyond
            # that means keys that hash badly at this size: spread them wider.
            and len(self._stash) > 64 + (self._count >> 4)
            and self._count * 8 > len(self._tab) * _B
        ):
            self._rebuild(len(self._tab) * 2, compact=False)

    def pop(self, key: bytes, default: int | None = None) -> int | None:
        _, x, y, t, pos, slot, _, _, _ = self._reprobe(key)
        if pos < 0:
            return default
        value = self._mve[_W * pos + 2] & _LOW32
        self._mve[_W * pos] = self._mve[_W * pos + 1] = self._mve[_W * pos + 2] = 0
        if slot >= 0:
            self._mvt[slot] = self._mvt[slot + 1] = 0
        else:
            del self._stash[x, y, t]
        self._count -= 1
        self._release_tail(t)
        if self._count < self._shrink_at:
            self._rebuild(max(_MIN_BUCKETS, len(self._tab) // 4), compact=True)
        elif self._used - self._count > max(self._count, 4096):
            self._compact()
        return value

    # -- iteration -------------------------------------------------------------
    def items(self) -> Iterator[tuple[bytes, int]]:
        """Every (key, value), in insertion order; the table must not change
        meanwhile."""
        ent = self._ent[: self._used]
        live = ent[:, 2] != 0
        key = self._key
        rows = zip(ent[live, 0].tolist(), ent[live, 1].tolist(), ent[live, 2].tolist(), strict=True)
        for x, y, a in rows:
            yield key(x, y, a >> 32), a & _LOW32

    def keys(self) -> Iterator[bytes]:
        for k, _ in self.items():
            yield k

    def values(self) -> Iterator[int]:
        aux = self._ent[: self._used, 2]
        yield from (aux[aux != 0] & np.uint64(_LOW32)).tolist()

    # -- batch lookup ----------------------------------------------------------
    def find(self, keys: Sequence[bytes], prefix: bool = False) -> np.ndarray:
        """The value of every key, -1 for a missing one; with `prefix`, only the
        values of the keys before the first missing one (a shorter array),
        found by following runs of entries (module docstring). The array may
        be a view of the table's memory: read it before the next change.

        Keys of one length >= HEAD with one tail (a prompt's block keys) are
        read with one join and strided views; other batches are split key by key.
        """
        n = len(keys)
        if not n or not self._count:
            return _EMPTY if prefix else np.full(n, -1, np.int64)
        first = keys[0]
        size = len(first)
        joined = b"".join(keys)
        tq: np.ndarray | None = None
        if (
            size >= HEAD
            and len(joined) == n * size
            and max(map(len, keys)) == size  # with the total: every key is `size` long
            and (
                size == HEAD
                or np.ndarray((n,), _void(size - HEAD), joined, HEAD, (size,)).tobytes()
                == first[HEAD:] * n
            )
        ):
            t_one = self._tail_ids.get(first[HEAD:], _NO_TAIL)
            if t_one == _NO_TAIL:  # no key of the table has this tail
                return _EMPTY if prefix else np.full(n, -1, np.int64)
            x = np.ndarray((n,), _U64LE, joined, 0, (size,))
            y = np.ndarray((n,), _U64LE, joined, WORD, (size,))
            if self._mix[t_one]:
                x = x ^ np.uint64(self._mix[t_one])
        else:
            t_one = 0
            xs, ys, ts = [], [], []
            tail_ids, mix = self._tail_ids, self._mix
            for key in keys:
                head, yk, tail = _split(key)
                t = tail_ids.get(tail, _NO_TAIL)
                xs.append(head ^ mix[t] if t != _NO_TAIL else 0)
                ys.append(yk)
                ts.append(t)
            x = np.array(xs, np.uint64)
            y = np.array(ys, np.uint64)
            tq = np.array(ts, np.uint64)
        # An x equal to an entry's or a slot's is a match if its tail is equal
        # too. With one tail in the table, an x match at a live entry or an
        # occupied slot is one; holes and empty slots read x == 0, so a query
        # x == 0 is kept from them (`_find_all` checks x; a run checks for
        # holes when the entries have any).
        if tq is None and len(self._tail_ids) != 1:
            tq = np.full(n, t_one, np.uint64)
        if not prefix:
            return self._find_all(x, y, tq)
        ent_x, ent_y, used = self._ent_x, self._ent_y, self._used
        holes = used != self._count
        parts: list[np.ndarray] = []
        i = runs = run = 0
        while (p := self._position(keys[i])) >= 0:  # key i is there: a run starts
            if runs == _RUNS or (runs and run < _LONG_RUN):
                # scattered keys: the rest through the table, all at once
                parts.append(self._find_prefix(x[i:], y[i:], None if tq is None else tq[i:]))
                break
            end = min(n, i + used - p)
            whole = i == 0 and end == n
            same = ent_x[p : p + end - i] == (x if whole else x[i:end])
            same &= ent_y[p : p + end - i] == (y if whole else y[i:end])
            if tq is not None:
                same &= self._ent_tail[p : p + end - i] == tq[i:end]
            elif holes:
                same &= self._ent_tail[p : p + end - i] != 0
            run = end - i if np.count_nonzero(same) == end - i else int(same.argmin())
            parts.append(self._ent_value[p : p + run])
            i += run
            runs += 1
            if i == n:
                break
        if not parts:
            return _EMPTY
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _find_prefix(self, x: np.ndarray, y: np.ndarray, tq: np.ndarray | None) -> np.ndarray:
        found = self._find_all(x, y, tq)
        missing = (found < 0).nonzero()[0]
        return found[: missing[0]] if len(missing) else found

    def _find_all(self, x: np.ndarray, y: np.ndarray, tq: np.ndarray | None) -> np.ndarray:
        """Every key through the table at once: gather each key's bucket,
        compare x (and tail), then y at the entries of the slots that matched;
        -1 where missing. `tq`: each key's tail id, None when the table has
        one tail."""
        n = len(x)
        if tq is None and np.count_nonzero(x) != n:  # x == 0 would match empty slots
            tq = np.full(n, next(iter(self._tail_ids.values())), np.uint64)
        g = self._tab.take(((x * _MULT_NP) >> self._shift_np).view(np.int64), axis=0)
        hits = (g[:, :, 0] == x[:, None]).ravel().nonzero()[0]  # ascending
        word = g.reshape(-1)[1::2].take(hits)
        k = hits >> _LOG_B  # the key of each hit
        at = ((word >> np.uint64(32)) - np.uint64(1)).view(np.int64)
        ok = self._ent_words.take(at * _W + 1) == y.take(k)
        if tq is not None:
            ok &= ((word >> np.uint64(24)) & np.uint64(_SLOT_TAIL)) == tq.take(k)
        if np.count_nonzero(ok) != len(ok):
            k, word = k[ok], word[ok]
        if len(k) == n:  # every key found once, in order
            return (word & np.uint64(_SLOT_VALUE)).view(np.int64)
        out = np.full(n, -1, np.int64)
        out[k] = word & np.uint64(_SLOT_VALUE)
        if self._stash and len(k) < n:
            stash, t_all = self._stash, self._tails_of(tq, n)
            for i in (out < 0).nonzero()[0].tolist():
                p = stash.get((int(x[i]), int(y[i]), t_all[i]), -1)
                if p >= 0:
                    out[i] = self._mve[_W * p + 2] & _LOW32
        return out

    def _tails_of(self, tq: np.ndarray | None, n: int) -> list[int]:
        if tq is not None:
            return tq.tolist()
        (only,) = self._tail_ids.values()
        return [only] * n


def _split(key: bytes) -> tuple[int, int, Tail]:
    """A key's head (its two words, as ints) and its tail (see `Tail`)."""
    if len(key) >= HEAD:
        x, y = key[:WORD], key[WORD:HEAD]
        return int.from_bytes(x, "little"), int.from_bytes(y, "little"), key[HEAD:]
    head = key.ljust(HEAD, b"\0")
    return int.from_bytes(head[:WORD], "little"), int.from_bytes(head[WORD:], "little"), len(key)


def _rows(a: np.ndarray) -> np.ndarray:
    """Entries (x, y, aux) as one 24-byte item each, for fast gathers."""
    return a.reshape(-1, _W).view(_ROW).reshape(-1)


def _pairs(a: np.ndarray) -> np.ndarray:
    """A uint64 array of (x, word) pairs as one 16-byte item per pair: numpy
    gathers and scatters those 2-5x faster than rows of a 2-D array."""
    return a.reshape(-1, 2).view(_PAIR).reshape(-1)


def _prefix_counts(flags: np.ndarray) -> np.ndarray:
    """For flags of whole 8-slot buckets: how many of each slot's bucket's
    slots up to and including it are set (as uint8)."""
    if sys.byteorder != "little":
        return np.cumsum(flags.reshape(-1, _B), axis=1, dtype=np.uint8).ravel()
    lanes = flags.view(np.uint8).view(np.uint64)  # one bucket per uint64, slot 0 lowest
    return (lanes * np.uint64(0x0101010101010101)).view(np.uint8)


def _word(pos: int, t: int, value: int) -> int:
    """A table slot's second word."""
    return (pos + 1) << 32 | t << 24 | value


_EMPTY = np.empty(0, np.int64)
_U64LE = np.dtype("<u8")
_PAIR = np.dtype("V16")
_ROW = np.dtype("V24")


@functools.cache
def _void(size: int) -> np.dtype:
    return np.dtype(f"V{size}")
