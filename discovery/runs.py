"""Runs: how a node's block locations travel through etcd.

A node publishes the blocks it stored one after another (a prompt's in
prompt order, then the next prompt's) as one etcd value, up to 1,024 keys: a
run record (the keys' shared tail once, each key's head, split as
discovery/key_split.py says, and a bit per key for the disk tier). A prompt
of a hundred blocks costs one write, not a hundred; a tier change or an
eviction rewrites its run (or deletes it, once it holds nothing), and as LRU
eviction follows the order blocks were stored, a burst of evictions touches
one or two runs.

`RunBook` is the publisher's side: it turns the ordered changes of a node's
tiers into dirty runs. `RunRecord` is the value, the only codec for it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgpack
import numpy as np

from discovery.key_split import HEAD_BYTES as HEAD
from discovery.tier import Tier

RUN_VERSION = 2  # 2: 16-byte heads (keyed 128-bit block hashes)
# A head as a record numpy sorts and compares whole (its bytes, as two words).
_HEAD_DTYPE = np.dtype([("lo", "<u8"), ("hi", "<u8")])
assert _HEAD_DTYPE.itemsize == HEAD
MAX_RUN_KEYS = 1024  # one value of about 16 KiB; a longer prompt takes several runs


@dataclass(frozen=True, slots=True)
class RunRecord:
    """Keys `heads[i] + tail`, in prompt order, each with its tier."""

    tail: bytes
    heads: bytes  # HEAD bytes per key
    disk: bytes  # bit i (little-endian bit order) set: key i is in the disk tier

    def __len__(self) -> int:
        return len(self.heads) // HEAD

    def block_keys(self) -> list[bytes]:
        h, t = self.heads, self.tail
        return [h[i : i + HEAD] + t for i in range(0, len(h), HEAD)]

    def tiers(self) -> list[Tier]:
        bits = int.from_bytes(self.disk, "little")
        return [Tier.DISK if bits >> i & 1 else Tier.HOST for i in range(len(self))]

    def changes_since(self, old: RunRecord | None) -> tuple[list[bytes], list[tuple[bytes, Tier]]]:
        """What a mirror must do to go from `old` (the run's previous value) to
        this one: the keys gone, and the keys new or in another tier. A run
        is rewritten whole for every change (a few keys evicted, the open run
        grown), so this compares heads in numpy and builds only the keys
        that changed: a rewrite of 1,024 keys costs tens of microseconds."""
        if old is None or old.tail != self.tail:
            gone = [] if old is None else old.block_keys()
            return gone, list(zip(self.block_keys(), self.tiers(), strict=True))
        heads, disk = self._arrays()
        old_heads, old_disk = old._arrays()
        by_head = np.argsort(old_heads)
        sorted_old = old_heads[by_head]
        at = np.minimum(np.searchsorted(sorted_old, heads), len(sorted_old) - 1)
        same = (sorted_old[at] == heads) & (old_disk[by_head][at] == disk)
        sorted_new = np.sort(heads)
        at = np.minimum(np.searchsorted(sorted_new, old_heads), len(sorted_new) - 1)
        gone = old_heads[sorted_new[at] != old_heads]
        tail, changed = self.tail, np.flatnonzero(~same)
        return (
            [h.tobytes() + tail for h in gone],
            [
                (heads[i].tobytes() + tail, Tier.DISK if disk[i] else Tier.HOST)
                for i in changed.tolist()
            ],
        )

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        heads = np.frombuffer(self.heads, dtype=_HEAD_DTYPE)
        bits = np.unpackbits(np.frombuffer(self.disk, dtype=np.uint8), bitorder="little")
        return heads, bits[: len(heads)].astype(bool)

    @classmethod
    def of(cls, keys: list[bytes], tiers: list[Tier]) -> RunRecord:
        """Keys that share one tail (everything after the head), each at least HEAD long."""
        tail = keys[0][HEAD:]
        if any(len(k) < HEAD or k[HEAD:] != tail for k in keys):
            raise ValueError("a run's keys share one tail")
        bits = sum(1 << i for i, t in enumerate(tiers) if t is Tier.DISK)
        disk = bits.to_bytes((len(keys) + 7) // 8, "little")
        return cls(tail, b"".join(k[:HEAD] for k in keys), disk)

    def encode(self) -> bytes:
        return msgpack.packb({"v": RUN_VERSION, "t": self.tail, "h": self.heads, "d": self.disk})

    @classmethod
    def decode(cls, data: bytes) -> RunRecord:
        """Raises ValueError on anything `encode` did not produce."""
        try:
            d = msgpack.unpackb(data, raw=True)
        except Exception as e:
            raise ValueError(f"run record is not msgpack: {e}") from None
        if not isinstance(d, dict) or d.get(b"v") != RUN_VERSION:
            raise ValueError("run record of an unknown version")
        tail, heads, disk = d.get(b"t"), d.get(b"h"), d.get(b"d")
        if not all(isinstance(x, bytes) for x in (tail, heads, disk)):
            raise ValueError("run record fields must be bytes")
        n, rest = divmod(len(heads), HEAD)  # type: ignore[arg-type]
        if rest or not 0 < n <= MAX_RUN_KEYS or len(disk) != (n + 7) // 8:  # type: ignore[arg-type]
            raise ValueError("run record of a bad size")
        return cls(tail, heads, disk)  # type: ignore[arg-type]


@dataclass(slots=True)
class _Run:
    tail: bytes
    keys: list[bytes] = field(default_factory=list)
    tiers: list[Tier | None] = field(default_factory=list)  # None: gone (still a member)
    births: list[float] = field(default_factory=list)  # when each key was last added
    present: int = 0
    # Lost a member since it was last taken: its record goes out before any
    # record that may have gained the key (see RunBook).
    shrunk: bool = False
    pos: dict[bytes, int] = field(default_factory=dict)


class RunBook:
    """Invariants: every key the node holds is a member of exactly one run
    (`member`), at its position in that run; a run's record lists its members
    that are held, in order. A key leaves its run's membership only when the
    run is deleted (nothing held) or compacted; until then a key that comes
    back returns to the same run, so a key never moves between two live runs
    whose records could reach a mirror in either order. When it does move
    (its old run dropped it), the old run is marked `shrunk`: the publisher
    writes shrunk runs' records first, then the others.

    A run is what the node stored one block after another: a new key joins
    the run whose last member precedes it in its batch of changes (a prompt
    continues), else the newest run, up to `max_run_keys`. A node's changes
    come in the order an engine stored its blocks, so a prompt's keys sit
    together, in prompt order; and as LRU eviction follows the same order, a
    flush's evictions and tier changes touch one or two runs, not one per
    prompt. (Measured on `kvbm bench index --nodes`' trace: runs of one
    prompt each cost 90-150 etcd writes per 1,000 blocks, runs of 1,024 keys
    17-27 with a 0.5-1 s flush interval.)
    """

    def __init__(self, max_run_keys: int = MAX_RUN_KEYS) -> None:
        self.max_run_keys = max_run_keys
        self.runs: dict[int, _Run] = {}
        self.member: dict[bytes, int] = {}  # key -> run id
        self.dirty: set[int] = set()
        self._next = 0
        self._newest = -1

    def __len__(self) -> int:
        return sum(r.present for r in self.runs.values())

    def held(self) -> dict[bytes, Tier]:
        """Every key held, and its tier."""
        return {
            k: t
            for run in self.runs.values()
            for k, t in zip(run.keys, run.tiers, strict=True)
            if t is not None
        }

    def apply(self, changes: dict[bytes, Tier | None], now: float | None = None) -> None:
        """Changes in the order they happened (prompt order): key -> tier, or None: gone."""
        now = time.monotonic() if now is None else now
        prev: bytes | None = None
        for key, tier in changes.items():
            rid = self.member.get(key)
            if rid is not None:
                self._set(rid, key, tier, now)
            elif tier is not None:
                self._add(key, Tier(tier), prev, now)
            prev = key if tier is not None else None

    def _set(self, rid: int, key: bytes, tier: Tier | None, now: float) -> None:
        run = self.runs[rid]
        i = run.pos[key]
        old = run.tiers[i]
        if old == tier:
            return
        run.tiers[i] = None if tier is None else Tier(tier)
        if old is None:
            run.births[i] = now  # back: as young as a new key
        run.present += (tier is not None) - (old is not None)
        self.dirty.add(rid)
        if not run.present:
            self._drop(rid)
        elif len(run.keys) > 64 and run.present * 2 < len(run.keys):
            self._compact(rid)

    def _add(self, key: bytes, tier: Tier, prev: bytes | None, now: float) -> None:
        if len(key) < HEAD:
            raise ValueError(f"a block key has at least {HEAD} bytes")
        rid = self.member.get(prev) if prev is not None else None
        if rid is None or self.runs[rid].keys[-1] != prev:
            rid = self._newest
        run = self.runs.get(rid)
        if run is None or len(run.keys) >= self.max_run_keys or key[HEAD:] != run.tail:
            rid, self._next = self._next, self._next + 1
            run = self.runs[rid] = _Run(key[HEAD:])
            self._newest = rid
        run.pos[key] = len(run.keys)
        run.keys.append(key)
        run.tiers.append(tier)
        run.births.append(now)
        run.present += 1
        self.member[key] = rid
        self.dirty.add(rid)

    def _drop(self, rid: int) -> None:
        run = self.runs.pop(rid)
        for k in run.keys:
            del self.member[k]

    def _compact(self, rid: int) -> None:
        """Forget members that are gone, so a long-lived run does not grow without end."""
        run = self.runs[rid]
        kept = [i for i, t in enumerate(run.tiers) if t is not None]
        for k, t in zip(run.keys, run.tiers, strict=True):
            if t is None:
                del self.member[k]
        run.keys = [run.keys[i] for i in kept]
        run.tiers = [run.tiers[i] for i in kept]
        run.births = [run.births[i] for i in kept]
        run.pos = {k: i for i, k in enumerate(run.keys)}
        run.shrunk = True

    def record(self, rid: int, cutoff: float = float("inf")) -> RunRecord | None:
        """The run's record now: its keys held and added at `cutoff` or
        before (younger ones are not published yet); None: nothing to show
        (the record is deleted, or never written)."""
        run = self.runs.get(rid)
        if run is None:
            return None
        held = [
            (k, t)
            for k, t, b in zip(run.keys, run.tiers, run.births, strict=True)
            if t is not None and b <= cutoff
        ]
        if not held:
            return None
        return RunRecord.of([k for k, _ in held], [t for _, t in held])  # type: ignore[misc]

    def youngest_unshown(self, rid: int, cutoff: float) -> float | None:
        """The earliest birth after `cutoff` of a key the run holds: when its
        record must be written again; None: every key is shown."""
        run = self.runs.get(rid)
        if run is None:
            return None
        births = zip(run.tiers, run.births, strict=True)
        later = [b for t, b in births if t is not None and b > cutoff]
        return min(later) if later else None

    def shrunk(self, rid: int) -> bool:
        """Whether the run lost members (or is gone) since it was last taken."""
        run = self.runs.get(rid)
        return run is None or run.shrunk

    def mark_shrunk(self, rid: int) -> None:
        run = self.runs.get(rid)
        if run is not None:
            run.shrunk = True

    def take(self, rids: set[int]) -> None:
        """These runs' records are on their way: clear their marks."""
        self.dirty -= rids
        for rid in rids:
            run = self.runs.get(rid)
            if run is not None:
                run.shrunk = False

    def take_records(self) -> tuple[list[tuple[int, RunRecord | None]], ...]:
        """Every dirty run's record now, every key shown (None: delete it), in
        two phases: the runs that lost keys, then the rest. Within a phase the
        order does not matter (the etcd index writes a phase in concurrent
        transactions); a phase must be applied whole before the next."""
        first = [rid for rid in self.dirty if self.shrunk(rid)]
        then = [rid for rid in self.dirty if not self.shrunk(rid)]
        self.take(self.dirty.copy())
        return tuple([(rid, self.record(rid)) for rid in phase] for phase in (first, then))

    def everything(self) -> set[int]:
        return set(self.runs)
