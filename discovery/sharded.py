"""The sharded location index: no node mirrors the fleet.

Each key has one owner (discovery/owners.py: rendezvous over the live
nodes). A node tells each owner which of the owner's keys it holds
(`publish`, sent in one batch per owner at each `flush`), keeps the
locations of the keys it owns (discovery/owner_table.py), and answers a
lookup by asking the owners of the keys, all at once (`lookup`). A node
spends memory on 1/N of the fleet's locations at 12 bytes each, plus its
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
  it holds there, and forgets what it was told of shards it no longer owns.
- A batch that fails stays pending (newer changes win) and goes again at
  the next flush, to whoever owns its keys by then.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Container, Mapping, Sequence
from types import MappingProxyType

import numpy as np
import xxhash

from discovery.owner_table import OwnerTable, key_x
from discovery.owners import OwnerRing, shard_of
from discovery.records import LookupResult, Tier, runs_of

log = logging.getLogger("discovery.sharded")
_NOBODY: Mapping[str, Tier] = MappingProxyType({})

MAX_KEYS_PER_CALL = 4096
PROBE_STRIDE = 16  # a lookup's first round asks for every 16th key (and the last)
MAX_HOLDERS = 8  # per key in an owner's answer (what a lookup needs; a frame's map holds 64)
MAX_LOCATIONS = 20_000_000  # an owner's table: about 240 MB
Session = int  # the etcd lease of the node's record
# (owner, session, keys, tiers) -> True once the owner has them
Send = Callable[[str, Session, list[bytes], list[Tier | None]], Awaitable[bool]]
# (owner, keys) -> holders of each key, or None when the owner did not answer
Ask = Callable[[str, list[bytes]], Awaitable[list[dict[str, Tier]] | None]]


class ShardedLocations:
    """Invariants: `held` is what this node holds, as it last published it;
    `_pending[owner]` the changes that owner has not acknowledged, each key
    under the owner of its shard in `ring`; `table` holds locations only of
    shards this node owns in `ring`, each holder's from the one session
    `_sessions[holder]`, which is the lease on its record as this node last
    saw it (`_leases`)."""

    def __init__(
        self,
        me: str,
        send: Send | None = None,
        ask: Ask | None = None,
        max_locations: int = MAX_LOCATIONS,
    ) -> None:
        """`send` and `ask`: the calls to other nodes (None: nobody can be
        reached yet; a node sets them once its peer connections exist)."""
        self.me = me
        self.send: Send = send or _unreachable
        self.ask: Ask = ask or _unreachable
        # connects to an owner ahead of its first call (a lookup waits on
        # that call, on an engine's scheduling path); None: calls connect
        self.warm: Callable[[str], Awaitable[object]] | None = None
        self._warming: set[asyncio.Task] = set()
        self.max_locations = max_locations
        self.session: Session = 0  # none yet
        self._leases: dict[str, int] = {}  # the members' records' leases, as seen
        self.ring = OwnerRing()
        self.table = OwnerTable()
        self.held: dict[bytes, Tier] = {}
        self.over_cap = 0  # locations refused at max_locations
        self.stale = 0  # batches refused: not under the lease the holder's record has
        self._mine = np.zeros(0, bool)  # shards this node owns (a mask over SHARDS)
        self._pending: dict[str, dict[bytes, Tier | None]] = {}
        self._flushing = asyncio.Lock()
        self._names: list[str] = []
        self._ids: dict[str, int] = {}
        self._sessions: dict[int, int] = {}

    # -- this node's own keys ----------------------------------------------
    def publish(self, changes: Mapping[bytes, Tier | None]) -> None:
        """This node's tiers changed: a key now held in a tier, or gone (None)."""
        held = self.held
        for k, t in changes.items():
            if t is None:
                held.pop(k, None)
            else:
                held[k] = t
        self._route(list(changes), list(changes.values()))

    def new_session(self, lease: int) -> None:
        """A new session (lease) in etcd: owners replace everything this node
        told them before with what it holds now."""
        self.session = lease
        self._pending.clear()
        self._route(list(self.held), list(self.held.values()))

    def _route(self, keys: list[bytes], tiers: list[Tier | None], older: bool = False) -> None:
        """Queue changes for the owners of their keys. `older`: changes sent
        before that failed; a newer change of the same key wins."""
        owners = self.ring.owners_of(key_x(keys))
        pending = self._pending
        for k, t, o in zip(keys, tiers, owners, strict=False):  # no owners: no ring yet
            batch = pending.get(o)
            if batch is None:
                batch = pending[o] = {}
            if older:
                batch.setdefault(k, t)
            else:
                batch[k] = t

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
            if mine and not self.place(self.me, session, list(mine), list(mine.values())):
                self._route(list(mine), list(mine.values()), older=True)

            async def one(owner: str, batch: dict[bytes, Tier | None]) -> None:
                keys, tiers = list(batch), list(batch.values())
                for i in range(0, len(keys), MAX_KEYS_PER_CALL):
                    part = slice(i, i + MAX_KEYS_PER_CALL)
                    try:
                        ok = await self.send(owner, session, keys[part], tiers[part])
                    except Exception as e:  # a caller's transport: whatever it raises, try later
                        log.info("locations not sent owner=%s error=%r", owner, e)
                        ok = False
                    if not ok:
                        if self.session == session:
                            self._route(keys[i:], tiers[i:], older=True)
                        return

            await asyncio.gather(*(one(o, b) for o, b in pending.items()))

    @property
    def pending(self) -> int:
        return sum(len(b) for b in self._pending.values())

    # -- the fleet ---------------------------------------------------------
    def set_members(self, leases: Mapping[str, int]) -> None:
        """The live nodes that share this node's keys (itself included), each
        with the lease its record is under. A holder whose lease changed or
        that left loses the locations of its old session here."""
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
        if len(self._mine):
            self.table.drop_shards(self._mine & ~mine)
        self._mine = mine
        pending, self._pending = self._pending, {}
        for batch in pending.values():
            self._route(list(batch), list(batch.values()))
        moved = ring.moved(old)
        if self.held and moved.any():
            keys = list(self.held)
            there = moved[shard_of(key_x(keys))].tolist()
            again = [k for k, m in zip(keys, there, strict=True) if m]
            self._route(again, [self.held[k] for k in again], older=True)

    # -- the owner's side --------------------------------------------------
    def place(
        self, node: str, session: Session, keys: list[bytes], tiers: Sequence[str | None]
    ) -> bool:
        """`node` says it holds `keys` in `tiers` now (None: no longer; a
        tier's name will do, as a peer sends it). This owner takes the keys
        of its own shards. False: some keys were not taken (not this
        owner's, as its ring has it; or the session is not the lease this
        owner sees on the node's record, yet or any more): the sender
        routes them again, to whoever owns them by then. Raises ValueError
        for a tier that is not one."""
        tiers = [None if t is None else Tier(t) for t in tiers]
        if not session or self._leases.get(node) != session:
            self.stale += 1
            return False
        h = self._holder(node)
        self._sessions[h] = session  # set_members dropped any older session's locations
        if not len(self._mine):
            return False  # no ring yet: nothing is ours
        ours = self._mine[shard_of(key_x(keys))].tolist()
        whole = all(ours)
        if not whole:
            keys = [k for k, m in zip(keys, ours, strict=True) if m]
            tiers = [t for t, m in zip(tiers, ours, strict=True) if m]
        if len(self.table) + len(keys) > self.max_locations:
            self.over_cap += 1  # updates and removals still apply; nothing new is kept
            known = [h in found for found in self.table.holders(keys)]
            keys = [k for k, m in zip(keys, known, strict=True) if m]
            tiers = [t for t, m in zip(tiers, known, strict=True) if m]
        self.table.place(h, keys, tiers)
        return whole

    def holders(self, keys: Sequence[bytes], asker: str = "") -> list[dict[str, Tier]]:
        """Who holds each key, as far as this owner knows ({} for keys it does
        not own); at most MAX_HOLDERS per key. A lookup needs one holder per
        run, not all of them: those in the host tier first, then in an order
        of their own for each asker (a hash of holder and asker), so that one
        asker sees the same few holders at every key of a prompt, and
        different askers spread their pulls over all the holders."""
        names = self._names
        out = []
        for found in self.table.holders(keys):
            if len(found) > MAX_HOLDERS:
                rank = self._rank(asker)
                best = sorted(found.items(), key=lambda ht: (ht[1] != Tier.HOST, rank(ht[0])))
                found = dict(best[:MAX_HOLDERS])
            out.append({names[h]: t for h, t in found.items()})
        return out

    def _rank(self, asker: str) -> Callable[[int], int]:
        """The same order at every owner (a hash, not Python's salted one)."""
        names, salt = self._names, asker.encode() + b"\0"
        return lambda h: xxhash.xxh3_64_intdigest(salt + names[h].encode())

    def dump(self) -> dict[str, dict[str, str]]:
        """This owner's share, by key x in hex: holder -> tier (tests, debugging)."""
        out: dict[str, dict[str, str]] = {}
        for x, h, tier in self.table.items():
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
        self, keys: Sequence[bytes], live: Container[str], stride: int = PROBE_STRIDE
    ) -> LookupResult:
        """Who holds `keys`, a prompt's blocks in order: the prefix this node
        holds, then peers' runs (`live`: the peers that may be named).

        A key's owner is chosen by the key, so a prompt's keys are spread
        over every owner; asking for all of them would cost a call to each.
        So the first round asks only for every `stride`-th key and the last
        (one call per owner of those). The live holders two probes share, in
        the same tier, hold the keys between them too: a prompt's blocks are
        stored, used and evicted together (oldest first). The second round
        asks for the keys between two probes that share none (where the
        held prefix ends, or its holders or tiers change), all such gaps at
        once. The pin at the holder is the truth; a wrong guess here costs a
        shorter pull, never a wrong block. (A holder whose run ends between
        two probes that another spans is left out there: the other reaches
        farther. So the prefix this node holds may be said shorter than it
        is; the node asks about the keys after its own.)
        """
        n = len(keys)
        if not n:
            return LookupResult(0)
        probes = sorted({*range(0, n, stride), n - 1})
        found = await self._ask_owners(keys, probes)
        held = [self._anyone(found[p], live) for p in probes]
        end = next((j for j, h in enumerate(held) if not h), len(probes))  # first probe nobody has
        if end == 0:
            return LookupResult(0)
        last = min(end, len(probes) - 1)
        shared = {
            j: self._shared(found[probes[j - 1]], found[probes[j]], live)
            for j in range(1, last + 1)
        }
        gaps = [
            i for j, both in shared.items() if not both for i in range(probes[j - 1] + 1, probes[j])
        ]
        if gaps:
            found.update(await self._ask_owners(keys, gaps))
        stop = probes[last] + 1 if end < len(probes) else n
        holders: list[Mapping[str, Tier]] = []
        j = 0
        for i in range(stop):
            while probes[j] < i:
                j += 1
            holders.append(found[i] if i in found else shared[j])
        return runs_of(holders, range(len(holders) + 1), self.me, live)

    def _shared(
        self, a: Mapping[str, Tier], b: Mapping[str, Tier], live: Container[str]
    ) -> dict[str, Tier]:
        """The holders two probes share, in the same tier, that a lookup may
        name ({}: the keys between are asked)."""
        return {h: t for h, t in b.items() if a.get(h) == t and (h == self.me or h in live)}

    def _anyone(self, holders: Mapping[str, Tier], live: Container[str]) -> bool:
        return any(h == self.me or h in live for h in holders)

    async def _ask_owners(
        self, keys: Sequence[bytes], positions: list[int]
    ) -> dict[int, Mapping[str, Tier]]:
        """Holders of keys[p] for each p in `positions`, one call per owner, all
        at once; {} for a key whose owner did not answer."""
        asked = [keys[p] for p in positions]
        owners = self.ring.owners_of(key_x(asked))
        by_owner: dict[str, list[int]] = {}
        for p, o in zip(positions, owners, strict=False):
            by_owner.setdefault(o, []).append(p)
        found: dict[int, Mapping[str, Tier]] = dict.fromkeys(positions, _NOBODY)

        async def one(owner: str, where: list[int]) -> None:
            part = [keys[p] for p in where]
            if owner == self.me:
                got: list[dict[str, Tier]] | None = self.holders(part, self.me)
            else:
                try:
                    got = await self.ask(owner, part)
                except Exception as e:  # the owner is away: its keys are unknown now
                    log.info("lookup not answered owner=%s error=%r", owner, e)
                    got = None
            if got is not None and len(got) == len(part):
                found.update(zip(where, got, strict=True))

        calls = [
            (o, w[i : i + MAX_KEYS_PER_CALL])
            for o, w in by_owner.items()
            for i in range(0, len(w), MAX_KEYS_PER_CALL)
        ]
        await asyncio.gather(*(one(o, w) for o, w in calls))
        return found


async def _unreachable(*_args: object) -> None:
    """The calls of a node that cannot reach others yet: nothing sent, nothing known."""
    return None
