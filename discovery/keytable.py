"""A compact hash table from opaque byte keys to small ints, with a vectorized
batch probe.

Why not a dict: a mirror of a fleet's index holds millions of keys, and a
lookup probes 128 of them at once. A dict probe is a chain of dependent cache
misses (index slot -> entry -> the stored bytes object for the equality test),
and 128 of them run one after another: about 60 us against a million keys on
a cold cache, and ~110 bytes of heap per key. Here a key costs 16 bytes of one
numpy array, and a batch probe is a handful of numpy operations over all keys
at once (one gather of every key's bucket, one compare), so the CPU overlaps
the memory loads instead of waiting for each in turn.

Exact, not a digest: a key is split into its first 8 bytes (`head`, the
sequence hash in a block key) and the rest (`tail`: fingerprint, rank and
namespace, shared by almost every key of a mirror). Tails are interned to
small ids; a slot stores `x = head ^ mix[tail]` and `(tail id << 32) | value`,
from which the key can be rebuilt. The per-tail mix sends keys that differ only
in their tail (tensor-parallel ranks of one block) to different buckets.

Layout: `nb` buckets of `_B` slots; a key lives in bucket `hash(x) >> shift`
or, when that bucket is full (or `x` is 0, the empty-slot pattern), in a small
dict, the stash. Lookups never walk probe chains and deletions need no
tombstones. The table doubles when it is half full, so the stash stays below
one key in a hundred; a stash that grows anyway (keys that hash badly) costs
speed, never correctness, and is bounded by dict performance.

Not thread-safe for writers; a batch probe reads one consistent set of arrays.
"""

from __future__ import annotations

import functools
import random
import sys
from collections.abc import Iterator, Sequence

import numpy as np

_B = 8  # slots per bucket: one bucket is 128 bytes, two adjacent cache lines
_LOG_B = 3
_MIN_BUCKETS = 16
_MULT = 0x9E3779B97F4A7C15  # odd 64-bit constant: multiplicative (Fibonacci) hashing
_MULT_NP = np.uint64(_MULT)
_MASK64 = (1 << 64) - 1
_LOW32 = 0xFFFFFFFF
_NO_TAIL = 0xFFFFFFFF  # a tail id never assigned: matches nothing
# halves of a uint64 viewed as two uint32, in memory order
_LO, _HI = (0, 1) if sys.byteorder == "little" else (1, 0)

# What follows a key's 8-byte head; for a key shorter than 8 bytes, its length
# (the head is then the key zero-padded), so it never equals a longer key.
Tail = bytes | int


_Probe = tuple[bytes, int, int, int, "Tail", int]


class KeyTable:
    """bytes -> int in [0, 2**32). Single writer; see the module docstring."""

    def __init__(self) -> None:
        self.clear()

    # -- storage -------------------------------------------------------------
    def clear(self) -> None:
        self._count = 0
        self._last: _Probe | None = None
        self._stash: dict[tuple[int, int], int] = {}  # (x, tail id) -> value
        self._tail_ids: dict[Tail, int] = {}
        self._tails: list[Tail | None] = [None]  # id 0 is never used: empty slots read 0
        self._mix: list[int] = [0]
        self._tail_refs: list[int] = [0]
        self._free_tails: list[int] = []
        self._alloc(_MIN_BUCKETS)

    def _alloc(self, buckets: int) -> None:
        self._tab = np.zeros((buckets, _B, 2), np.uint64)  # [..., 0] x, [..., 1] aux
        # Scalar access for put/pop: a memoryview indexes ~5x faster than numpy.
        self._mv = memoryview(self._tab).cast("B").cast("Q")
        bits = buckets.bit_length() - 1
        self._shift = 64 - bits
        self._shift_np = np.uint64(self._shift)
        self._grow_at = buckets * _B // 2
        self._shrink_at = buckets * _B // 16 if buckets > _MIN_BUCKETS else -1

    def _rebuild(self, buckets: int) -> None:
        """Re-place every entry (table and stash) into `buckets` buckets, all at
        once: sort by bucket, rank within it, and scatter; what does not fit
        goes to the stash."""
        self._last = None
        flat = self._tab.reshape(-1, 2)
        live = flat[:, 1] != 0
        xs, auxs = flat[live, 0], flat[live, 1]
        if self._stash:
            sx = np.array([x for x, _ in self._stash], np.uint64)
            sa = np.array([(t << 32) | v for (_, t), v in self._stash.items()], np.uint64)
            xs, auxs = np.concatenate((xs, sx)), np.concatenate((auxs, sa))
        self._alloc(buckets)
        b = ((xs * _MULT_NP) >> self._shift_np).astype(np.int64)
        order = np.argsort(b, kind="stable")
        b, xs, auxs = b[order], xs[order], auxs[order]
        rank = np.arange(len(b)) - np.searchsorted(b, b)
        fit = (rank < _B) & (xs != 0)
        self._tab[b[fit], rank[fit], 0] = xs[fit]
        self._tab[b[fit], rank[fit], 1] = auxs[fit]
        rest = ~fit
        self._stash = {
            (x, a >> 32): a & _LOW32
            for x, a in zip(xs[rest].tolist(), auxs[rest].tolist(), strict=True)
        }

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
            # batch probe skips an xor; every other tail gets random bits.
            self._mix[t] = random.getrandbits(64) if self._tail_ids else 0
            self._tail_ids[tail] = t
        return t

    def _release_tail(self, t: int) -> None:
        self._tail_refs[t] -= 1
        if not self._tail_refs[t]:
            del self._tail_ids[self._tails[t]]
            self._tails[t] = None
            self._free_tails.append(t)

    def _key(self, x: int, t: int) -> bytes:
        tail = self._tails[t]
        head = (x ^ self._mix[t]).to_bytes(8, "little")
        return head[:tail] if isinstance(tail, int) else head + tail

    # -- scalar operations -----------------------------------------------------
    def _probe(self, key: bytes) -> _Probe:
        """Where `key` is: (key, x, tail id or 0 when no key has its tail, word
        index of its slot or -1, tail, its bucket's first word). Remembered
        until the next change, so a `get` followed by a `set` or `pop` of the
        same key object (what the mirror does for every event) probes once."""
        if len(key) >= 8:
            head, tail = int.from_bytes(key[:8], "little"), key[8:]
        else:
            head, tail = int.from_bytes(key, "little"), len(key)
        t = self._tail_ids.get(tail, 0)
        if not t:
            probe = self._last = (key, 0, 0, -1, tail, -1)
            return probe
        x = head ^ self._mix[t]
        base = (((x * _MULT) & _MASK64) >> self._shift) << (_LOG_B + 1)
        row = self._mv[base : base + 2 * _B].tolist()
        xs = row[0::2]
        slot = -1
        if x in xs:
            i = xs.index(x)
            while row[2 * i + 1] >> 32 != t:  # the same x under another tail
                if x not in xs[i + 1 :]:
                    break
                i = xs.index(x, i + 1)
            else:
                slot = base + 2 * i
        probe = self._last = (key, x, t, slot, tail, base)
        return probe

    def _reprobe(self, key: bytes) -> _Probe:
        """`_probe`, reusing the remembered one; forgets it (the caller changes
        the table)."""
        last = self._last
        if last is None or last[0] is not key:
            last = self._probe(key)
        self._last = None
        return last

    def get(self, key: bytes, default: int | None = None) -> int | None:
        _, x, t, slot, _, _ = self._probe(key)
        if slot >= 0:
            return self._mv[slot + 1] & _LOW32
        if t and self._stash:
            return self._stash.get((x, t), default)
        return default

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self.get(key) is not None

    def __len__(self) -> int:
        return self._count

    def set(self, key: bytes, value: int) -> None:
        """Insert or overwrite."""
        if not 0 <= value <= _LOW32:
            raise ValueError(f"value out of range: {value}")
        _, x, t, slot, tail, base = self._reprobe(key)
        if slot >= 0:
            self._mv[slot + 1] = (t << 32) | value
            return
        if t and self._stash and (x, t) in self._stash:
            self._stash[x, t] = value
            return
        if not t:  # the first key with this tail
            t = self._tail_id(tail)
            x = int.from_bytes(key[:8], "little") ^ self._mix[t]
            base = -1
        self._count += 1
        self._tail_refs[t] += 1
        if self._count > self._grow_at:
            self._rebuild(len(self._tab) * 2)
            base = -1
        self._place(x, t, value, base)

    def _place(self, x: int, t: int, value: int, base: int = -1) -> None:
        """Put a new (x, t) into its bucket (whose first word is `base`, -1:
        not known), or into the stash when the bucket is full or x is 0 (the
        empty-slot pattern)."""
        if base < 0:
            base = (((x * _MULT) & _MASK64) >> self._shift) << (_LOG_B + 1)
        auxs = self._mv[base + 1 : base + 2 * _B : 2].tolist()
        i = auxs.index(0) if x and 0 in auxs else -1
        if i >= 0:
            self._mv[base + 2 * i] = x
            self._mv[base + 2 * i + 1] = (t << 32) | value
            return
        self._stash[x, t] = value
        # A bucket overflows for ~1% of keys at half load; a stash far beyond
        # that means keys that hash badly at this size: spread them wider.
        if len(self._stash) > 64 + (self._count >> 4) and self._count * 8 > len(self._tab) * _B:
            self._rebuild(len(self._tab) * 2)

    def pop(self, key: bytes, default: int | None = None) -> int | None:
        _, x, t, slot, _, _ = self._reprobe(key)
        if slot >= 0:
            value = self._mv[slot + 1] & _LOW32
            self._mv[slot] = 0
            self._mv[slot + 1] = 0
        elif t and (x, t) in self._stash:
            value = self._stash.pop((x, t))
        else:
            return default
        self._count -= 1
        self._release_tail(t)
        if self._count < self._shrink_at:
            self._rebuild(max(_MIN_BUCKETS, len(self._tab) // 4))
        return value

    # -- iteration -------------------------------------------------------------
    def items(self) -> Iterator[tuple[bytes, int]]:
        """Every (key, value); the table must not change meanwhile."""
        flat = self._tab.reshape(-1, 2)
        live = flat[:, 1] != 0
        key = self._key
        for x, a in zip(flat[live, 0].tolist(), flat[live, 1].tolist(), strict=True):
            yield key(x, a >> 32), a & _LOW32
        for (x, t), v in list(self._stash.items()):
            yield key(x, t), v

    def keys(self) -> Iterator[bytes]:
        for k, _ in self.items():
            yield k

    def values(self) -> Iterator[int]:
        aux = self._tab[:, :, 1]
        yield from (aux[aux != 0] & np.uint64(_LOW32)).tolist()
        yield from list(self._stash.values())

    # -- batch probe -------------------------------------------------------------
    def find(self, keys: Sequence[bytes], prefix: bool = False) -> np.ndarray:
        """The value of every key, -1 for a missing one; with `prefix`, only the
        values of the keys before the first missing one (a shorter array).

        Fast path: keys of one length >= 8 and one tail (a prompt's block
        keys): one join, strided views for heads and tails, then bucket,
        gather, compare for all keys at once. Other batches are split key by
        key in Python and probed the same way.
        """
        n = len(keys)
        if not n or not self._count:
            return _EMPTY if prefix else np.full(n, -1, np.int64)
        tab, shift = self._tab, self._shift_np  # one consistent snapshot
        first = keys[0]
        size = len(first)
        joined = b"".join(keys)
        t_one = 0
        if (
            size >= 8
            and len(joined) == n * size
            and max(map(len, keys)) == size  # with the total: every key is `size` long
            and (
                size == 8
                or np.ndarray((n,), _void(size - 8), joined, 8, (size,)).tobytes() == first[8:] * n
            )
        ):
            t_one = self._tail_ids.get(first[8:], _NO_TAIL)
            if t_one == _NO_TAIL:  # no key of the table has this tail
                return _EMPTY if prefix else np.full(n, -1, np.int64)
            x = np.ndarray((n,), _U64LE, joined, 0, (size,))
            if self._mix[t_one]:
                x = x ^ np.uint64(self._mix[t_one])
            tq: np.ndarray | int = t_one
            xs: list[int] | None = None
            ts: list[int] | None = None
        else:
            xs, ts = [], []
            tail_ids, mix = self._tail_ids, self._mix
            for key in keys:
                if len(key) >= 8:
                    head, tail = int.from_bytes(key[:8], "little"), key[8:]
                else:
                    head, tail = int.from_bytes(key, "little"), len(key)
                t = tail_ids.get(tail, _NO_TAIL)
                xs.append(head ^ mix[t] if t != _NO_TAIL else 0)
                ts.append(t)
            x = np.array(xs, np.uint64)
            tq = np.array(ts, np.uint32)
        g = tab.take(((x * _MULT_NP) >> shift).view(np.int64), axis=0)  # (n, B, 2)
        hits = (g[:, :, 0] == x[:, None]).ravel().nonzero()[0]  # ascending
        aux = g.reshape(-1)[1::2].take(hits)
        # An x match is a hit when its tail matches too. With one tail in the
        # table every occupied slot has it, and no occupied slot has x == 0
        # (those keys live in the stash), so then a batch without x == 0 needs
        # no check.
        if t_one and len(self._tail_ids) == 1 and np.count_nonzero(x) == n:
            if len(hits) == n:  # every key found once, in order
                return aux.view(np.uint32)[_LO::2]
            k = hits >> _LOG_B
        else:
            k = hits >> _LOG_B
            ok = aux.view(np.uint32)[_HI::2] == (tq if t_one else tq.take(k))
            if np.count_nonzero(ok) != len(ok):
                k, aux = k[ok], aux[ok]
            if len(k) == n:
                return aux.view(np.uint32)[_LO::2]
        vals = aux.view(np.uint32)[_LO::2]
        out = np.full(n, -1, np.int64)
        out[k] = vals
        if self._stash:
            for i in (out < 0).nonzero()[0].tolist():
                xi, ti = (int(x[i]), t_one) if xs is None else (xs[i], ts[i])  # type: ignore[index]
                v = self._stash.get((xi, ti))
                if v is None:
                    if prefix:
                        return out[:i]
                    continue
                out[i] = v
        if prefix:
            missing = (out < 0).nonzero()[0]
            return out[: missing[0]] if len(missing) else out
        return out


_EMPTY = np.empty(0, np.int64)
_U64LE = np.dtype("<u8")


@functools.cache
def _void(size: int) -> np.dtype:
    return np.dtype(f"V{size}")
