"""A node's local copy of one namespace of the index: node records in a dict,
block locations in a `KeyTable` (key -> id of a shared `Holders`), unpacked
from the nodes' run records (the records kept too: a run rewritten or
deleted tells which of its keys to forget).

Fed by etcd watch events (or directly, by the in-memory index). Lookups are
local reads, never an etcd round trip; the view may be a little stale, which
is safe: every pulled block is verified by the transport anyway.

With a signer, a node's locations are shown only while its record is
believed (signed under the lease etcd says it is under, and fresh: see
discovery/signing.py) and only those of that record's session (lease and
nonce): copies a dead node's values put back by an etcd writer are not.
Runs of a node not believed now wait (kept, not shown) for its record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from discovery.keytable import KeyTable
from discovery.mirror_views import Holders, Locations
from discovery.records import LookupResult, NodeRecord, PeerRun, runs_of
from discovery.runs import RunRecord
from discovery.schema import namespace_prefix, parse_path, run_path
from discovery.signing import IndexSigner, Signed, wall_ms
from discovery.tier import Tier

log = logging.getLogger("discovery.mirror")
# ~87 bytes a location (the key table, and the run values kept): about 1.4 GB
# of mirror before new locations are refused
MAX_LOCATIONS = 16_000_000


_NOBODY = Holders()
_UNBELIEVED = object()  # the session of a node whose record is not believed
Session = tuple[int, bytes] | None  # (lease, nonce) of a signed value; None: unsigned
# (key, its holders now: empty when nobody), and whether what the follower
# knew is to be forgotten first (the first batch of the whole mirror)
Follower = Callable[[list[tuple[bytes, Mapping[str, Tier]]], bool], None]
FOLLOW_BATCH = 65_536  # keys per call when the whole mirror is told


class IndexMirror:
    """Invariant: `locations[key]` holds node `n` only while a run record of
    `n` lists the key (as far as the events applied so far tell: a node's
    publisher never lets a key reach a mirror in two of its live records, see
    discovery/runs.py), and is never empty;
    `revision` is the etcd revision of the last event applied, so a watch
    resumes at revision + 1."""

    def __init__(
        self,
        namespace: str,
        signer: IndexSigner | None = None,
        max_locations: int = MAX_LOCATIONS,
    ) -> None:
        """`signer`: values must carry the fleet's MAC (a node's mirror); None
        takes values as they are (an in-memory index, a test's raw mirror)."""
        self.namespace = namespace
        self.prefix = namespace_prefix(namespace)
        self.signer = signer
        self.max_locations = max_locations
        self.nodes: dict[str, NodeRecord] = {}
        self.locations = Locations(self)
        self.revision = 0
        self.malformed = 0
        self.rejected = 0  # values without a good signature
        self.over_cap = 0  # new locations refused at max_locations
        self.stale = 0  # signed values refused as old: a record past its validity, a run replayed
        self.clock: Callable[[], int] = wall_ms  # ms (tests set their own)
        self._believed: dict[str, Signed] = {}  # node -> its record's signature (signed mode)
        self._names: dict[str, str] = {}  # one str object per node id, not per location
        self._follower: Follower | None = None
        self._reset_locations()

    def _reset_locations(self) -> None:
        self._runs: dict[bytes, RunRecord] = {}  # the run records applied, by etcd key
        # each kept run's node, session and stamp; the runs of each node
        self._run_meta: dict[bytes, tuple[str, Session, int]] = {}
        self._node_runs: dict[str, set[bytes]] = {}
        self._run_keys = 0  # keys in them
        self._table = KeyTable()
        # Holders by id, counted: an id is reused once no location points at it.
        self._holders: list[Holders | None] = []
        self._refs: list[int] = []
        self._free: list[int] = []
        self._ids: dict[frozenset, int] = {}

    def _intern(self, items: dict[str, Tier]) -> int:
        """The id of the shared Holders equal to `items`, with one more reference."""
        signature = frozenset(items.items())
        i = self._ids.get(signature)
        if i is None:
            if self._free:
                i = self._free.pop()
                self._holders[i], self._refs[i] = Holders(items), 0
            else:
                i = len(self._holders)
                self._holders.append(Holders(items))
                self._refs.append(0)
            self._ids[signature] = i
        self._refs[i] += 1
        return i

    def _release(self, i: int) -> None:
        self._refs[i] -= 1
        if not self._refs[i]:
            del self._ids[frozenset(self._holders[i].items())]  # type: ignore[union-attr]
            self._holders[i] = None
            self._free.append(i)

    def follow(self, follower: Follower) -> None:
        """Tell `follower` of every key whose holders change, one call per
        record applied: now, everything the mirror holds (in batches, the
        first flagged: forget what you knew), then each change, and
        everything again after a rebuild (`adopt`, `clear`)."""
        self._follower = follower
        self._tell_everything()

    def _tell(self, keys: Sequence[bytes]) -> None:
        if self._follower is not None and keys:
            self._follower([(k, self.locations.get(k, _NOBODY)) for k in keys], False)

    def _tell_everything(self) -> None:
        if self._follower is None:
            return
        batch: list[tuple[bytes, Mapping[str, Tier]]] = []
        first = True
        for item in self.locations.items():
            batch.append(item)
            if len(batch) == FOLLOW_BATCH:
                self._follower(batch, first)
                batch, first = [], False
        if batch or first:
            self._follower(batch, first)

    # -- feeding -----------------------------------------------------------
    def put(self, path: bytes, value: bytes, revision: int = 0, lease: int = 0) -> bool:
        """Apply one PUT (`lease`: the one etcd says the key is under); a
        malformed, unsigned or replayed key or value is logged and skipped
        (False: not applied)."""
        self.revision = max(self.revision, revision)
        signed: Signed | None = None
        if self.signer is not None:
            try:
                signed = self.signer.open(path, value, lease)
                value = signed.value
            except ValueError:
                self.rejected += 1
                _now_and_then(
                    self.rejected,
                    "dropping index values not signed by the fleet count=%d key=%r",
                    path[:120],
                )
                return False
        try:
            parsed = parse_path(self.prefix, path)
            if parsed.run_id is None:
                record = NodeRecord.decode(value)
                if record.node_id != parsed.node_id:
                    raise ValueError("node record under another node's key")
                return self._put_record(record, signed)
            run = RunRecord.decode(value)
        except Exception as e:  # whatever a hostile value raises, it is skipped
            self.malformed += 1
            _now_and_then(
                self.malformed,
                "skipping malformed index entries count=%d key=%r error=%s",
                path[:120],
                e,
            )
            return False
        name = self._names.setdefault(parsed.node_id, parsed.node_id)
        session = None if signed is None else signed.session
        stamp = 0 if signed is None else signed.stamp
        current, meta = self._current(name), self._run_meta.get(path)
        if signed is not None and (
            (meta is not None and meta[1] == session and stamp < meta[2])
            or (current is not _UNBELIEVED and session != current)
        ):
            # an older copy of this run, or a run of a session other than the
            # one believed now (a dead one's): not shown, not kept
            self.stale += 1
            _now_and_then(self.stale, "dropping replayed index values count=%d key=%r", path[:120])
            return False
        old = self._runs.get(path)
        grown = len(run) - (0 if old is None else len(old))
        if grown > 0 and self._run_keys + grown > 2 * self.max_locations:
            # The run values kept are capped too (a key several nodes hold is one
            # location of the table, one key in each of their runs): twice the table.
            self.over_cap += 1
            _now_and_then(
                self.over_cap, "index mirror full: a run is not kept refused=%d key=%r", path[:120]
            )
            return False
        self._run_keys += grown
        shown = old if meta is not None and meta[1] == current else None
        if session == current:
            gone, changed = run.changes_since(shown)
        else:  # waits for its node's record
            gone, changed = ([] if shown is None else shown.block_keys()), []
        for key in gone:
            self._unset(key, name)
        self._runs[path] = run
        self._run_meta[path] = (name, session, stamp)
        self._node_runs.setdefault(name, set()).add(path)
        for key, tier in changed:
            self._set(key, name, tier)
        if self._follower is not None:
            self._tell([*gone, *(k for k, _ in changed)])
        return True

    def delete(self, path: bytes, revision: int = 0) -> None:
        self.revision = max(self.revision, revision)
        try:
            parsed = parse_path(self.prefix, path)
        except ValueError:
            return
        if parsed.run_id is None:
            self.nodes.pop(parsed.node_id, None)
            self._believe(parsed.node_id, None)
            return
        self._tell(self._forget_run(path))

    def _forget_run(self, path: bytes) -> list[bytes]:
        """Drop a kept run; the keys it showed (unset here) are returned."""
        old = self._runs.pop(path, None)
        if old is None:
            return []
        self._run_keys -= len(old)
        node, session, _ = self._run_meta.pop(path)
        self._node_runs[node].discard(path)
        if not self._node_runs[node]:
            del self._node_runs[node]
        if session != self._current(node):
            return []
        keys = old.block_keys()
        for key in keys:
            self._unset(key, node)
        return keys

    # -- who is believed ---------------------------------------------------
    def _current(self, node: str) -> object:
        """The session whose runs are shown for `node`: None unsigned,
        _UNBELIEVED while no record of it is believed."""
        if self.signer is None:
            return None
        believed = self._believed.get(node)
        return _UNBELIEVED if believed is None else believed.session

    def _put_record(self, record: NodeRecord, signed: Signed | None) -> bool:
        node = record.node_id
        if signed is not None:
            now = self._believed.get(node)
            if now is not None and now.session == signed.session and signed.stamp <= now.stamp:
                return False  # an older copy of what is believed
            if not signed.valid or not signed.fresh(self.clock()):
                self.stale += 1
                _now_and_then(
                    self.stale, "dropping node records out of date count=%d node=%s", node
                )
                return False
            self._believe(node, signed)
        self.nodes[node] = record
        return True

    def _believe(self, node: str, signed: Signed | None) -> None:
        """`node`'s record is now the one signed so (None: none is): its runs
        of that session are shown, those of the session shown before are
        not, and those of any other session are dropped once one is believed."""
        if self.signer is None:
            return
        before = self._current(node)
        if signed is None:
            self._believed.pop(node, None)
        else:
            self._believed[node] = signed
        after = self._current(node)
        if before == after:
            return
        touched: list[bytes] = []
        for path in list(self._node_runs.get(node, ())):
            session = self._run_meta[path][1]
            if session == after:
                run = self._runs[path]
                for key, tier in zip(run.block_keys(), run.tiers(), strict=True):
                    self._set(key, node, tier)
                    touched.append(key)
            elif session == before:
                keys = self._runs[path].block_keys()
                for key in keys:
                    self._unset(key, node)
                touched += keys
            if signed is not None and session != after:
                self._forget_run(path)
        self._tell(touched)

    def expire(self) -> list[str]:
        """Stop believing records past their validity (their node stopped
        refreshing them: it died); the nodes dropped."""
        now = self.clock()
        old = [n for n, s in self._believed.items() if not s.fresh(now)]
        for node in old:
            self.nodes.pop(node, None)
            self._believe(node, None)
        return old

    def apply_runs(
        self, node_id: str, phases: Sequence[Sequence[tuple[int, RunRecord | None]]]
    ) -> None:
        """A node's run records, phase by phase, as `RunBook.take_records` gives
        them (no etcd between: the in-memory index, tests)."""
        for phase in phases:
            for rid, record in phase:
                path = run_path(self.namespace, node_id, rid)
                if record is None:
                    self.delete(path)
                else:
                    self.put(path, record.encode())

    def _set(self, key: bytes, name: str, tier: Tier) -> None:
        old_id = self._table.get(key)
        if old_id is None and len(self._table) >= self.max_locations:
            self.over_cap += 1
            _now_and_then(
                self.over_cap,
                "index mirror full: new locations are not kept refused=%d max_locations=%d",
                self.max_locations,
            )
            return
        old = _NOBODY if old_id is None else self._holders[old_id]
        if old.get(name) is not tier:  # type: ignore[union-attr]
            self._table.set(key, self._intern({**old, name: tier}))  # type: ignore[dict-item]
            if old_id is not None:
                self._release(old_id)

    def _unset(self, key: bytes, node_id: str) -> None:
        old_id = self._table.get(key)
        if old_id is None:
            return
        old = self._holders[old_id]
        if node_id not in old:  # type: ignore[operator]
            return
        rest = {n: t for n, t in old.items() if n != node_id}  # type: ignore[union-attr]
        if rest:
            self._table.set(key, self._intern(rest))
        else:
            self._table.pop(key)
        self._release(old_id)

    def adopt(self, fresh: IndexMirror) -> None:
        """Take over another mirror's content in one step (a resync), so lookups
        see the old view or the new one, never a half-built one."""
        self.nodes, self._names, self._runs = fresh.nodes, fresh._names, fresh._runs
        self._believed, self._run_meta = fresh._believed, fresh._run_meta
        self._node_runs = fresh._node_runs
        self._run_keys = fresh._run_keys
        self._table, self._holders, self._refs = fresh._table, fresh._holders, fresh._refs
        self._free, self._ids = fresh._free, fresh._ids
        self.revision = fresh.revision
        self.malformed += fresh.malformed
        self.rejected += fresh.rejected
        self.over_cap += fresh.over_cap
        self.stale += fresh.stale
        self._tell_everything()

    def clear(self) -> None:
        self.nodes.clear()
        self._believed.clear()
        self._reset_locations()
        self._tell_everything()

    # -- reading -----------------------------------------------------------
    def holders(self, key: bytes) -> dict[str, Tier]:
        return dict(self.locations.get(key, _NOBODY))  # type: ignore[arg-type]

    def lookup(self, keys: Sequence[bytes], local_node: str) -> LookupResult:
        """The prefix of `keys` the local node holds, then, greedily, the peer
        holding the longest run from each point on: for a contiguous prefix
        the farthest-reaching choice needs the fewest peers. Peers whose node
        record is gone (dead, or not yet seen) are skipped.

        The table finds the ids of the found prefix with a few numpy
        operations (discovery/keytable.py); one bytes comparison tells when
        they are all one Holders object (the common case), else numpy finds
        where consecutive keys change Holders object, so a prompt costs a few
        Python steps per group of keys, not per key.
        """
        ids = self._table.find(keys, prefix=True)  # the ids of the found prefix
        m = len(ids)
        if not m:
            return LookupResult(0)
        raw, size = ids.tobytes(), ids.itemsize
        holders = self._holders
        # One group (every id equals the next), the common case: the prefix is
        # local, or the first live peer holds it all.
        if raw[size:] == raw[:-size]:
            group: Holders = holders[int(ids[0])]  # type: ignore[assignment]
            if local_node in group:
                return LookupResult(m)
            for node, tier in group.items():
                if node in self.nodes:  # not local_node: it is not in the group
                    return LookupResult(0, (PeerRun(node, 0, m, (tier,) * m),))
            return LookupResult(0)
        cuts = (ids[1:] != ids[:-1]).nonzero()[0]
        firsts = [0, *(cuts + 1).tolist()]
        groups: list[Holders] = list(map(holders.__getitem__, ids.take(firsts).tolist()))
        return runs_of(groups, [*firsts, m], local_node, self.nodes)


def _now_and_then(count: int, msg: str, *args: object) -> None:
    """Log a warning at counts 1, 2, 4, 8, ... (`count` first in `msg`): a
    flood of bad values cannot flood the log too."""
    if count & (count - 1) == 0:
        log.warning(msg, count, *args)
