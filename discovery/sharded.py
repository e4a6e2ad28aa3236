"""The sharded location index: no node mirrors the fleet.

Each key has one owner (discovery/owners.py: the owner of its place's
shard, by rendezvous over the live nodes; a prompt's keys share a few). A
node tells each owner which of the owner's keys it holds (`publish`, sent
in one batch per owner at each `flush`), keeps the locations of the keys
it owns (discovery/owner_table.py), and answers a lookup by asking the
owners of the keys, all at once (`lookup`). A node spends memory on about
1/N of the fleet's locations at 12 bytes each (more at the owner of a
prefix many prompts share: the keys after it sit in its groups), plus its
own keys; locations never touch etcd, which carries only the node records
that say who is live (the ring). The calls between nodes are the caller's
(`send`, `ask`): this package never imports the transport.

A lookup's answer is advice; the holder's pin is the truth. What keeps the
advice close to it:
- A holder's batches carry its session: the etcd lease its record is
  under. An owner takes a batch only under the lease it sees on the
  holder's record now (its own watch of the records), and keeps one
  lease's locations per holder: when the record goes (the lease expired:
  a dead node) or comes back under another lease (a restart, etcd wiped),
  the old lease's locations go. A batch the owner refuses (its watch is
  behind, or the session is over) is sent again later; a new session
  sends everything anew. No revision is compared: a wiped etcd starts its
  revisions again, leases are new.
- When the ring changes, each node sends the new owners of moved shards all
  it holds there. Until those batches arrive (a flush away) the new owner
  knows nothing of the moved shards, so for MOVE_GRACE_S the old owner
  keeps them (taking no changes) and lookups ask it too, while it is in
  the ring, where the new one names no live holder; then it forgets them.
- A batch that fails stays pending (newer changes win) and goes again at
  the next flush, to whoever owns its keys by then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Container, Iterable, Mapping, Sequence
from types import MappingProxyType

import numpy as np
import xxhash

from discovery.owner_table import OwnerTable
from discovery.owners import SHARDS, OwnerRing, places, shard_at
from discovery.records import LookupResult, runs_of
from discovery.tier import Tier

log = logging.getLogger("discovery.sharded")
_NOBODY: Mapping[str, Tier] = MappingProxyType({})

MAX_PLACES_PER_CALL = 4096  # keys in one call to an owner (its answer, one frame)
MAX_HOLDERS_ANSWERED = 8  # per key in an owner's answer (what a lookup needs)
MAX_LOCATIONS = 20_000_000  # an owner's table: about 240 MB
MOVE_GRACE_S = 5.0  # a moved shard's old owner answers for it this long (holders flush every 0.5 s)
Session = int  # the etcd lease of the node's record
# (owner, session, places, tiers) -> True once the owner has them
Send = Callable[[str, Session, np.ndarray, list[Tier | None]], Awaitable[bool]]
# (owner, places) -> runs of (n, holders of each of n keys), or None when the owner did not answer
Ask = Callable[[str, np.ndarray], Awaitable[list[tuple[int, dict[str, Tier]]] | None]]
Warm = Callable[[str], Awaitable[object]]  # connect to a node ahead of its first call


class ShardedLocations:
    """Invariants: `held` is what this node holds, as it last published it
    (key -> its place, its tier); `_pending[owner]` the changes that owner
    has not acknowledged (place -> tier), each under the owner of its shard
    in `ring`; `table` holds locations only of
    shards this node owns in `ring` or keeps (`_kept_until[s]` > 0: a shard
    it owned before a ring change, until then), each holder's from the one
    session `_sessions[holder]`, which is the lease on its record as this
    node last saw it (`_leases`)."""

    def __init__(
        self,
        me: str,
        send: Send | None = None,
        ask: Ask | None = None,
        warm: Warm | None = None,
        max_locations: int = MAX_LOCATIONS,
    ) -> None:
        """`send` and `ask`: the calls to other nodes (None: nobody can be
        reached: a lone node, a test). `warm`: connects to an owner ahead of
        its first call (a lookup waits on that call, on an engine's
        scheduling path); None: calls connect."""
        self.me = me
        self.send: Send = send or _unreachable
        self.ask: Ask = ask or _unreachable
        self.warm = warm
        self._warming: set[asyncio.Task] = set()
        self.max_locations = max_locations
        self.session: Session = 0  # none yet
        self._leases: dict[str, int] = {}  # the members' records' leases, as seen
        self.ring = OwnerRing()
        self.table = OwnerTable()
        self.held: dict[bytes, tuple[int, Tier]] = {}
        self.over_cap = 0  # locations refused at max_locations
        self.stale = 0  # batches refused: not under the lease the holder's record has
        self._mine = np.zeros(0, bool)  # shards this node owns (a mask over SHARDS)
        self.clock: Callable[[], float] = time.monotonic
        # per shard, for MOVE_GRACE_S after it moved: until when this node
        # keeps it (it owned it), and who owned it before (lookups ask them)
        self._kept_until = np.zeros(SHARDS)
        self._prev = np.full(SHARDS, "", dtype=object)
        self._prev_until = np.zeros(SHARDS)
        self._next_expiry = float("inf")
        self._pending: dict[str, dict[int, Tier | None]] = {}
        self._flushing = asyncio.Lock()
        self._names: list[str] = []
        self._ids: dict[str, int] = {}
        self._sessions: dict[int, int] = {}

    # -- this node's own keys ----------------------------------------------
    def publish(
        self, changes: Mapping[bytes, Tier | None], anchors: Mapping[bytes, int] | None = None
    ) -> None:
        """This node's tiers changed: a key now held in a tier, or gone (None).
        `anchors`: keys' anchors (owners.places; a key not named is its own),
        read for keys not held before."""
        held = self.held
        keys = list(changes)
        new = [i for i, k in enumerate(keys) if k not in held and changes[k] is not None]
        if new:
            named = None if anchors is None else [anchors.get(keys[i], 0) for i in new]
            got = places([keys[i] for i in new], named)
            for i, x in zip(new, got.tolist(), strict=True):
                held[keys[i]] = (x, Tier.HOST)  # the tier is set below
        xs: list[int] = []
        tiers: list[Tier | None] = []
        for k, t in changes.items():
            was = held.pop(k, None) if t is None else held.get(k)
            if was is None:
                continue  # gone and never told
            if t is not None:
                held[k] = (was[0], t)
            xs.append(was[0])
            tiers.append(t)
        self._route(xs, tiers)

    def new_session(self, lease: int) -> None:
        """A new session (lease) in etcd: owners replace everything this node
        told them before with what it holds now."""
        self.session = lease
        self._pending.clear()
        self._route([x for x, _ in self.held.values()], [t for _, t in self.held.values()])

    def _route(self, xs: list[int], tiers: list[Tier | None], older: bool = False) -> None:
        """Queue changes (by place) for the owners of their shards. `older`:
        changes sent before that failed; a newer change of the same key wins."""
        owners = self.ring.owners_of(np.asarray(xs, np.uint64))
        pending = self._pending
        for x, t, o in zip(xs, tiers, owners, strict=False):  # no owners: no ring yet
            batch = pending.get(o)
            if batch is None:
                batch = pending[o] = {}
            if older:
                batch.setdefault(x, t)
            else:
                batch[x] = t

    async def flush(self) -> None:
        """Send each owner its pending changes, all owners at once. One flush
        at a time: a batch that failed goes back before any later change of
        its keys is sent (else its old value would overwrite the newer one
        at the owner), and only if the session it belongs to still stands
        (a new session sends everything anew)."""
        async with self._flushing:
            session = self.session
            pending, self._pending = self._pending, {}
            mine = pending.pop(self.me, None)
            if mine and not self.place(self.me, session, _array(mine), list(mine.values())):
                self._route(list(mine), list(mine.values()), older=True)

            async def one(owner: str, batch: dict[int, Tier | None]) -> None:
                xs, tiers = list(batch), list(batch.values())
                for i in range(0, len(xs), MAX_PLACES_PER_CALL):
                    part = slice(i, i + MAX_PLACES_PER_CALL)
                    try:
                        ok = await self.send(owner, session, _array(xs[part]), tiers[part])
                    except Exception as e:  # a caller's transport: whatever it raises, try later
                        log.info("locations not sent owner=%s error=%r", owner, e)
                        ok = False
                    if not ok:
                        if self.session == session:
                            self._route(xs[i:], tiers[i:], older=True)
                        return

            await asyncio.gather(*(one(o, b) for o, b in pending.items()))

    @property
    def pending(self) -> int:
        return sum(len(b) for b in self._pending.values())

    def stats(self) -> dict[str, int]:
        """For `kvbm status`."""
        return {
            "members": len(self.ring.nodes),
            "locations_published": len(self.held),
            "locations_owned": len(self.table),
            "owned_bytes": self.table.nbytes,
            "pending": self.pending,
            "refused": self.stale,
        }

    def warm_ring(self) -> None:
        """Connect ahead to every member of the ring (a node that begins to
        serve: before, it could reach nobody)."""
        if self.warm is None:
            return
        for node in set(self.ring.nodes) - {self.me}:
            task = asyncio.ensure_future(self.warm(node))
            self._warming.add(task)
            task.add_done_callback(self._warming.discard)

    # -- the fleet ---------------------------------------------------------
    def expire(self) -> None:
        """Forget the shards kept whose grace period is over."""
        now = self.clock()
        if now < self._next_expiry:
            return
        done = (self._kept_until > 0) & (self._kept_until <= now)
        if done.any():
            self.table.drop_shards(done)
            self._kept_until[done] = 0
        self._prev_until[self._prev_until <= now] = 0
        later = np.concatenate([self._kept_until[self._kept_until > 0], self._prev_until])
        later = later[later > 0]
        self._next_expiry = float(later.min()) if len(later) else float("inf")

    def set_members(self, leases: Mapping[str, int]) -> None:
        """The live nodes that share this node's keys (itself included), each
        with the lease its record is under. A holder whose lease changed or
        that left loses the locations of its old session here."""
        self.expire()
        self._leases = dict(leases)
        ended = [h for h, lease in self._sessions.items() if leases.get(self._names[h]) != lease]
        if ended:
            self.table.drop(ended)
            for h in ended:
                del self._sessions[h]
        members = tuple(sorted(leases))
        if members == self.ring.nodes:
            return
        if self.warm is not None:
            for node in set(members) - set(self.ring.nodes) - {self.me}:
                task = asyncio.ensure_future(self.warm(node))
                self._warming.add(task)
                task.add_done_callback(self._warming.discard)
        ring = OwnerRing(members)
        old, self.ring = self.ring, ring
        mine = ring.shards_of(self.me)
        until = self.clock() + MOVE_GRACE_S
        if len(self._mine):
            # kept shards back here are stale (no changes came): their holders resend them
            back = mine & (self._kept_until > 0)
            if back.any():
                self.table.drop_shards(back)
                self._kept_until[back] = 0
            self._kept_until[self._mine & ~mine] = until
        self._mine = mine
        # this node's first ring: it joined one without it
        before = old if old.nodes else OwnerRing(set(members) - {self.me})
        if before.nodes:
            moved = ring.moved(before)
            self._prev[moved] = np.array(before.nodes, dtype=object)[before.owner[moved]]
            self._prev_until[moved] = until
        self._next_expiry = min(self._next_expiry, until)
        pending, self._pending = self._pending, {}
        for batch in pending.values():
            self._route(list(batch), list(batch.values()))
        moved = ring.moved(old)
        if self.held and moved.any():
            held = list(self.held.values())
            there = moved[shard_at(_array([x for x, _ in held]))].tolist()
            again = [xt for xt, m in zip(held, there, strict=True) if m]
            self._route([x for x, _ in again], [t for _, t in again], older=True)

    # -- the owner's side --------------------------------------------------
    def place(
        self, node: str, session: Session, xs: np.ndarray, tiers: Sequence[str | None]
    ) -> bool:
        """`node` says it holds the keys at places `xs` in `tiers` now (None:
        no longer; a tier's name will do, as a peer sends it). This owner
        takes the keys of its own shards. False: some keys were not taken (not this
        owner's, as its ring has it; or the session is not the lease this
        owner sees on the node's record, yet or any more): the sender
        routes them again, to whoever owns them by then. Raises ValueError
        for a tier that is not one."""
        tiers = [None if t is None else Tier(t) for t in tiers]
        self.expire()
        if not session or self._leases.get(node) != session:
            self.stale += 1
            return False
        h = self._holder(node)
        self._sessions[h] = session  # set_members dropped any older session's locations
        if not len(self._mine):
            return False  # no ring yet: nothing is ours
        ours = self._mine[shard_at(xs)]
        whole = bool(ours.all())
        if not whole:
            xs, tiers = xs[ours], [t for t, m in zip(tiers, ours.tolist(), strict=True) if m]
        if len(self.table) + len(xs) > self.max_locations:
            self.over_cap += 1  # updates and removals still apply; nothing new is kept
            known = np.array([h in found for found in self.table.holders(xs)], bool)
            xs, tiers = xs[known], [t for t, m in zip(tiers, known.tolist(), strict=True) if m]
        self.table.place(h, xs, tiers)
        return whole

    def holders(self, xs: np.ndarray, asker: str = "") -> list[tuple[int, dict[str, Tier]]]:
        """Who holds each key (by place), as far as this owner knows ({} for
        keys it does not own), as runs: (n, holders) for n consecutive keys
        with the same holders (a prompt's keys mostly share them, so an
        answer costs per run, not per key, on both sides). At most
        MAX_HOLDERS_ANSWERED per key: a lookup needs one holder per run, not all of
        them: those in the host tier first, then in an order of their own
        for each asker (a hash of holder and asker), so that one asker sees
        the same few holders at every key of a prompt, and different askers
        spread their pulls over all the holders."""
        self.expire()
        return [(n, self._named(found, asker)) for n, found in self.table.runs(xs)]

    def _named(self, found: dict[int, Tier], asker: str) -> dict[str, Tier]:
        if len(found) > MAX_HOLDERS_ANSWERED:
            rank = self._rank(asker)
            best = sorted(found.items(), key=lambda ht: (ht[1] != Tier.HOST, rank(ht[0])))
            found = dict(best[:MAX_HOLDERS_ANSWERED])
        names = self._names
        return {names[h]: t for h, t in found.items()}

    def _rank(self, asker: str) -> Callable[[int], int]:
        """The same order at every owner (a hash, not Python's salted one)."""
        names, salt = self._names, asker.encode() + b"\0"
        return lambda h: xxhash.xxh3_64_intdigest(salt + names[h].encode())

    def dump(self) -> dict[str, dict[str, str]]:
        """This owner's share, by place in hex: holder -> tier (tests,
        debugging; shards kept after a ring change are not its share)."""
        out: dict[str, dict[str, str]] = {}
        for x, h, tier in self.table.items():
            if not self._mine[shard_at(np.uint64(x))]:
                continue
            out.setdefault(f"{x:016x}", {})[self._names[h]] = tier.value
        return out

    def _holder(self, node: str) -> int:
        h = self._ids.get(node)
        if h is None:
            h = self._ids[node] = len(self._names)
            self._names.append(node)
        return h

    # -- lookups -----------------------------------------------------------
    async def lookup(
        self, keys: Sequence[bytes], live: Container[str], anchors: Sequence[int] | None = None
    ) -> LookupResult:
        """Who holds `keys`, a prompt's blocks in order: the prefix this node
        holds, then peers' runs (`live`: the peers that may be named).
        `anchors`: each key's, as `publish` takes them (None: each key its
        own). A prompt's keys sit at the owners of its
        groups, so this is one call to each, all at once, and the answers
        are exact (as of the owners' last batches)."""
        if not keys:
            return LookupResult(0)
        return await self._ask_owners(places(keys, anchors), live)

    async def _ask_owners(self, xs: np.ndarray, live: Container[str]) -> LookupResult:
        """Ask each owner of these places (one call each, all at once) who holds
        them; nobody, for the keys of an owner that did not answer. Within a
        ring change's grace period, the keys of moved shards are asked of
        their old owners too, whose answer stands where the new one names
        nobody (the holders' batches may not have reached it yet)."""
        self.expire()
        ring = self.ring
        if not ring.nodes:
            return LookupResult(0)
        shards = shard_at(xs)
        runs: list[Mapping[str, Tier]] = [_NOBODY]
        run_of = np.zeros(len(xs), np.intp)  # each key's run in `runs` (0: nobody)
        before_of = np.zeros(len(xs), np.intp)  # the same, from old owners

        async def one(owner: str, where: np.ndarray, into: np.ndarray) -> None:
            part = xs[where]
            if owner == self.me:
                got: list[tuple[int, dict[str, Tier]]] | None = self.holders(part, self.me)
            else:
                try:
                    got = await self.ask(owner, part)
                except Exception as e:  # the owner is away: its keys are unknown now
                    log.info("lookup not answered owner=%s error=%r", owner, e)
                    got = None
            if got is None or sum(n for n, _ in got) != len(where):
                return
            at = 0
            for n, holders in got:
                into[where[at : at + n]] = len(runs)
                runs.append(holders)
                at += n

        asked: dict[tuple[str, int], np.ndarray] = {}  # (owner, 0 now / 1 before) -> where
        owner_of = ring.owner[shards]
        for o in np.unique(owner_of).tolist():
            asked[ring.nodes[o], 0] = np.flatnonzero(owner_of == o)
        moved = self._prev_until[shards] > 0
        if moved.any():  # old owners still in the ring keep what moved from them a while
            prev = self._prev[shards]
            for name in set(prev[moved].tolist()) & set(ring.nodes):
                asked[name, 1] = np.flatnonzero(moved & (prev == name))
        calls = [
            one(owner, where[i : i + MAX_PLACES_PER_CALL], before_of if then else run_of)
            for (owner, then), where in asked.items()
            for i in range(0, len(where), MAX_PLACES_PER_CALL)
        ]
        await asyncio.gather(*calls)
        nobody = np.array([not _anyone(h, self.me, live) for h in runs], bool)
        run_of = np.where(nobody[run_of], before_of, run_of)
        starts = [0, *(np.flatnonzero(run_of[1:] != run_of[:-1]) + 1).tolist(), len(xs)]
        groups = [runs[r] for r in run_of[starts[:-1]].tolist()]
        return runs_of(groups, starts, self.me, live)


def _anyone(holders: Mapping[str, Tier], me: str, live: Container[str]) -> bool:
    return any(h == me or h in live for h in holders)


def _array(xs: Iterable[int]) -> np.ndarray:
    return np.fromiter(xs, np.uint64)


async def _unreachable(*_args: object) -> None:
    """The calls of a node that cannot reach others yet: nothing sent, nothing known."""
    return None
