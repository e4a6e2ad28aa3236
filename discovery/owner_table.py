"""The locations a node keeps for the keys it owns in a sharded index.

In a sharded index no node mirrors the fleet: each key has one owner
(discovery/owners.py), every node tells each owner which of the owner's
keys it holds, and lookups ask the owners. This is the owner's table:
(place, holder) -> tier, for about 1/N of the fleet's locations.

A location costs 12 bytes here, plus a little for changes not merged yet:
- a key is kept as its place (owners.places), 64 bits: its shard, then the
  low bits of the key's hash.
- `main`: every location, sorted by place, as two arrays (place, and the
  holder's index << 1 | disk bit): a lookup is one `searchsorted` per batch.
- `delta`: changes since the last merge, a dict by place; merged into `main`
  in one pass when it reaches 1/256 of it (MERGE_SHIFT), so a change costs
  a dict write and the pass's share, not a shift of the arrays (a change
  waiting in the dicts costs ~300 bytes: 1/256 of that is about 1 byte per
  location; a pass over 20M locations takes ~0.1 s, every 78,000 changes).

Single writer; holders are small ints the caller interns (node ids live
once, in the caller's record of the fleet).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from discovery.owners import shard_at
from discovery.tier import Tier

_MIN_DELTA = 4096
MERGE_SHIFT = 8  # the delta is merged at 1/2**8 of the arrays
_DISK = 1
_EMPTY_X = np.empty(0, np.uint64)
_EMPTY_W = np.empty(0, np.uint32)


class OwnerTable:
    """Invariant: a location (x, holder) is in `_delta` (tier code, or None
    for removed) or else in `_main`, never counted twice; `_main_x` is
    sorted. `len(self)` is the number of locations held."""

    def __init__(self, min_delta: int = _MIN_DELTA) -> None:
        """`min_delta`: changes held before the first merge (tests merge often)."""
        self._min_delta = min_delta
        self._main_x = _EMPTY_X
        self._main_w = _EMPTY_W
        self._delta: dict[int, dict[int, int | None]] = {}  # x -> holder -> tier code
        self._delta_entries = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        """The arrays' bytes (the delta's dicts come on top: module docstring)."""
        return self._main_x.nbytes + self._main_w.nbytes

    def place(self, holder: int, places: np.ndarray, tiers: Sequence[Tier | None]) -> None:
        """`holder` now holds each key (by place) in its tier, or no longer (None)."""
        if not 0 <= holder < 2**31:
            raise ValueError(f"holder index out of range: {holder}")
        xq = places
        lo = np.searchsorted(self._main_x, xq, "left").tolist()
        hi = np.searchsorted(self._main_x, xq, "right").tolist()
        main_w, delta = self._main_w, self._delta
        for x, a, b, tier in zip(xq.tolist(), lo, hi, tiers, strict=True):
            code = None if tier is None else (_DISK if tier == Tier.DISK else 0)
            row = delta.get(x)
            if row is not None and holder in row:
                before = row[holder]
            else:
                ws = main_w[a:b].tolist() if b > a else ()
                before = next((w & _DISK for w in ws if w >> 1 == holder), None)
            if before == code:
                continue
            self._count += (code is not None) - (before is not None)
            if row is None:
                row = delta[x] = {}
            if holder not in row:
                self._delta_entries += 1
            row[holder] = code
        if self._delta_entries > max(self._min_delta, len(self._main_x) >> MERGE_SHIFT):
            self.merge()

    def holders(self, places: np.ndarray) -> list[dict[int, Tier]]:
        """For each key (by place): holder -> tier."""
        xq = places
        lo = np.searchsorted(self._main_x, xq, "left").tolist()
        hi = np.searchsorted(self._main_x, xq, "right").tolist()
        out: list[dict[int, Tier]] = []
        main_w, delta = self._main_w, self._delta
        for x, a, b in zip(xq.tolist(), lo, hi, strict=True):
            found = {w >> 1: _TIERS[w & _DISK] for w in main_w[a:b].tolist()} if b > a else {}
            row = delta.get(x)
            if row:
                for holder, code in row.items():
                    if code is None:
                        found.pop(holder, None)
                    else:
                        found[holder] = _TIERS[code]
            out.append(found)
        return out

    def runs(self, places: np.ndarray) -> list[tuple[int, dict[int, Tier]]]:
        """`holders`, as runs: (n, holders) for n consecutive places with the
        same holders. A place with one holder or none, unchanged since the
        last merge (most of them), costs a dict membership test (the delta)
        and no other Python of its own."""
        n = len(places)
        if not n:
            return []
        lo = np.searchsorted(self._main_x, places, "left")
        hi = np.searchsorted(self._main_x, places, "right")
        code = np.full(n, -1, np.int64)  # holder << 1 | disk; -1: nobody; < -1: see `other`
        one = hi - lo == 1
        code[one] = self._main_w[lo[one]]
        odd = set(np.flatnonzero(hi - lo > 1).tolist())
        if self._delta:
            odd.update(i for i, x in enumerate(places.tolist()) if x in self._delta)
        at = np.asarray(sorted(odd), np.intp)
        other = dict(zip(at.tolist(), self.holders(places[at]), strict=True))
        code[at] = -2 - at
        edges = (np.flatnonzero(code[1:] != code[:-1]) + 1).tolist()
        out: list[tuple[int, dict[int, Tier]]] = []
        for a, b in zip([0, *edges], [*edges, n], strict=True):
            c = int(code[a])
            found = other[a] if c < -1 else {} if c < 0 else {c >> 1: _TIERS[c & _DISK]}
            if out and out[-1][1] == found:
                out[-1] = (out[-1][0] + b - a, found)
            else:
                out.append((b - a, found))
        return out

    def items(self) -> list[tuple[int, int, Tier]]:
        """Every location as (place, holder, tier) (tests, dumps)."""
        self.merge()
        xs, ws = self._main_x.tolist(), self._main_w.tolist()
        return [(x, w >> 1, _TIERS[w & _DISK]) for x, w in zip(xs, ws, strict=True)]

    def drop(self, holders: int | Sequence[int]) -> int:
        """Forget every location of these holders (they left, or their
        session ended), in one pass; returns how many."""
        self.merge()
        gone_ids = np.asarray([holders] if isinstance(holders, int) else holders, np.uint32)
        keep = ~np.isin(self._main_w >> 1, gone_ids)
        gone = len(keep) - int(keep.sum())
        if gone:
            self._main_x, self._main_w = self._main_x[keep], self._main_w[keep]
            self._count -= gone
        return gone

    def drop_shards(self, shards: np.ndarray) -> int:
        """Forget every location of the keys in `shards` (a bool mask over
        owners.SHARDS: shards this node no longer owns); returns how many."""
        self.merge()
        keep = ~shards[shard_at(self._main_x)]
        gone = len(keep) - int(keep.sum())
        if gone:
            self._main_x, self._main_w = self._main_x[keep], self._main_w[keep]
            self._count -= gone
        return gone

    def merge(self) -> None:
        """Fold the delta into the sorted arrays: O(n), no sort of `main`."""
        delta = self._delta
        if not delta:
            return
        main_x, main_w = self._main_x, self._main_w
        if len(main_x):  # drop every main location the delta names: re-added below if held
            gx = np.fromiter(delta, np.uint64, len(delta))
            lo = np.searchsorted(main_x, gx, "left")
            hi = np.searchsorted(main_x, gx, "right")
            named = []
            for i in np.flatnonzero(hi > lo).tolist():
                row = delta[int(gx[i])]
                a, b = int(lo[i]), int(hi[i])
                named += [a + j for j, w in enumerate(main_w[a:b].tolist()) if w >> 1 in row]
            if named:
                main_x, main_w = np.delete(main_x, named), np.delete(main_w, named)
        adds = [(x, h << 1 | c) for x, r in delta.items() for h, c in r.items() if c is not None]
        delta.clear()
        self._delta_entries = 0
        if adds:
            adds.sort()
            ax = np.fromiter((a[0] for a in adds), np.uint64, len(adds))
            aw = np.fromiter((a[1] for a in adds), np.uint32, len(adds))
            at = np.searchsorted(main_x, ax, "right")
            main_x, main_w = np.insert(main_x, at, ax), np.insert(main_w, at, aw)
        self._main_x, self._main_w = main_x, main_w


_TIERS = (Tier.HOST, Tier.DISK)
