"""The etcd-backed index of one node in one namespace: a publisher of this
node's record and block locations under its lease, and a mirror of everyone's.
With a sharded index (`locations`, discovery/sharded.py), etcd carries only
the node records: the mirror watches those (who is live: the owners' ring),
and locations go to their owners over the peer RPC instead.

Three tasks, each owning one stream: `_keepalive` refreshes the lease and
the record's stamp every TTL/3 (discovery/liveness.py: what makes a record
believed), and stops believing records past their validity; `_flusher`
writes the runs that changed (discovery/runs.py) in transactions of at most
128 operations; `_watcher` feeds the mirror. When
etcd is unreachable, lookups go on from the mirror, changes accumulate
(coalesced), and when etcd is back the node keeps its lease if it survived,
or takes a new one and republishes its whole state. The watch resumes at
the last revision seen + 1, or re-reads the namespace when that revision was
compacted away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

import aetcd
import aetcd.exceptions

from discovery.errors import IndexUnavailable
from discovery.etcd_client import open_client, read_prefix
from discovery.liveness import Session, claim
from discovery.mirror import IndexMirror
from discovery.records import LookupResult, NodeRecord, Tier
from discovery.runs import RunBook
from discovery.schema import namespace_prefix, node_path, nodes_prefix, run_path
from discovery.sharded import ShardedLocations
from discovery.signing import IndexSigner
from discovery.tls import EtcdTls

log = logging.getLogger("discovery.etcd")

MAX_TXN_OPS = 128  # etcd's default --max-txn-ops
_ETCD_ERRORS = (aetcd.exceptions.ClientError, OSError, asyncio.TimeoutError)
_LOST = (*_ETCD_ERRORS, IndexUnavailable)  # any of these: etcd is gone for now


class EtcdIndex:
    """Invariants: `book` holds everything this node publishes, as runs; its
    `dirty` runs are those etcd may not have as they are now, and `_ripening`
    those whose records leave out keys too young to publish, with the time
    the youngest comes of age. Every change reaches `book` at once and etcd
    at a later flush (every `flush_interval`, so that a burst of changes to
    one run costs one write) or republish. A key is published once the node
    has held it `publish_after` seconds: what lives shorter is not worth
    sharing and costs nothing. A run etcd never got is never deleted there.
    Runs that lost keys are written before the others (in transactions that
    have committed), so no mirror sees a key leave a run after it joined
    another."""

    def __init__(
        self,
        endpoints: Sequence[str],
        namespace: str,
        node: NodeRecord,
        lease_ttl: int = 10,
        flush_interval: float = 0.005,
        publish_after: float = 0.0,
        timeout: float = 2.0,
        watch: bool = True,
        signer: IndexSigner | None = None,
        tls: EtcdTls | None = None,
        locations: ShardedLocations | None = None,
    ) -> None:
        """`watch=False` makes a publisher without a mirror (load generators).
        `signer`: every value written is signed, and only values signed by the
        fleet reach the mirror (a node always has one). `tls`: etcd is reached
        in TLS, with this node's client certificate. `locations`: a sharded
        index (no runs in etcd; the mirror holds node records only)."""
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        if lease_ttl < 2:
            raise ValueError("lease_ttl must be at least 2 seconds")
        self.endpoints = list(endpoints)
        self.node = node
        self.lease_ttl = lease_ttl
        self.flush_interval = flush_interval
        self.publish_after = publish_after
        self.timeout = timeout
        self.signer = signer
        self.tls = tls
        self.mirror = IndexMirror(namespace, signer)
        self.book = RunBook()
        self.writes = 0  # etcd put/delete operations sent (for the bench)
        self.beats = 0  # the record written again, with a keepalive
        self.session = Session()
        self.bytes_written = 0  # keys and values put
        self._in_etcd: set[int] = set()  # runs etcd holds for us, as far as we know
        self._inflight: tuple[set[int], set[int]] = (set(), set())  # (first, then)
        self._hurry = False  # flush(): every key now, however young
        self._ripening: dict[int, float] = {}  # run id -> when its youngest key is due
        self._wakeup: asyncio.TimerHandle | None = None
        self._client: aetcd.Client | None = None
        self._endpoint = 0
        self._lease: int | None = None
        self._up = asyncio.Event()
        self._dirty = asyncio.Event()
        self._session_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self._watching = watch
        self._cluster_id: int | None = None
        self.locations = locations
        self._leases: dict[str, int] = {}  # node -> the lease of its record (sharded)
        # a sharded index watches the node records only (runs, if any, are not its)
        self._watch_prefix = nodes_prefix(namespace) if locations else self.mirror.prefix

    @property
    def namespace(self) -> str:
        return self.mirror.namespace

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    # -- the interface shared with MemoryIndex ------------------------------
    async def start(self) -> None:
        """Connect, register, read the namespace, and start the three tasks.
        Raises IndexUnavailable if etcd cannot be reached at all now."""
        try:
            await self._new_session()
            if self._watching:
                await self._resync()
        except _LOST as e:
            await self._drop_client()
            raise IndexUnavailable(f"cannot reach etcd at {self.endpoints}: {e!r}") from e
        except BaseException:
            await self._drop_client()
            raise
        tasks = [self._keepalive, self._flusher] + ([self._watcher] if self._watching else [])
        for fn in tasks:
            name = f"kvbm-index-{fn.__name__.strip('_')}"
            self._tasks.append(asyncio.create_task(self._supervised(fn), name=name))

    def publish(
        self,
        changes: Mapping[bytes, Tier | None],
        removes: Iterable[bytes] = (),
        anchors: Mapping[bytes, int] | None = None,
    ) -> None:
        """Record changes now (key -> tier, or None: gone, in the order they
        happened; `removes`: more keys gone); etcd (or the keys' owners) get
        them later. Never blocks. `anchors`: where a sharded index places
        keys (discovery/owners.places); the mirror has no use for them."""
        if self.locations is not None:
            self.locations.publish({**dict.fromkeys(removes), **changes}, anchors)
            self._dirty.set()
            return
        self.book.apply({**dict.fromkeys(removes), **changes})
        if self.book.dirty:
            self._dirty.set()

    def lookup(self, keys: Sequence[bytes]) -> LookupResult:
        """From the mirror (no etcd round trip); a sharded index asks owners: `locate`."""
        return self.mirror.lookup(keys, self.node.node_id)

    async def locate(
        self, keys: Sequence[bytes], anchors: Sequence[int] | None = None
    ) -> LookupResult:
        """Who holds `keys`: from the mirror, or, sharded, from their owners
        (`anchors`: each key's, as `publish` takes them)."""
        if self.locations is None:
            return self.lookup(keys)
        return await self.locations.lookup(keys, self.mirror.nodes, anchors)

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every change so far is in etcd, young runs included (or
        raise TimeoutError)."""
        self._hurry = True
        try:
            async with asyncio.timeout(timeout):
                while self.locations is not None and self.locations.pending:
                    await self.locations.flush()
                    if self.locations.pending:
                        await asyncio.sleep(self.flush_interval)
                while self.book.dirty or self._ripening or any(self._inflight):
                    self._dirty.set()
                    await asyncio.sleep(self.flush_interval)
        finally:
            self._hurry = False

    async def close(self, revoke: bool = True) -> None:
        """Flush what can be flushed, revoke the lease (so peers forget this node
        at once rather than after the TTL), stop the tasks."""
        self._closing = True
        if self._up.is_set():
            with contextlib.suppress(TimeoutError):
                await self.flush(timeout=self.timeout)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if revoke and self._lease is not None and self._client is not None:
            with contextlib.suppress(*_ETCD_ERRORS):
                await asyncio.wait_for(self._client.revoke_lease(self._lease), self.timeout)
        await self._drop_client()

    # -- sessions ----------------------------------------------------------
    async def _connect(self) -> aetcd.Client:
        if self._client is None:
            endpoint = self.endpoints[self._endpoint % len(self.endpoints)]
            self._client = open_client(endpoint, self.timeout, self.tls)
            await self._client.connect()
        return self._client

    def _live(self) -> aetcd.Client:
        if self._client is None:
            raise IndexUnavailable("no etcd connection")
        return self._client

    async def _drop_client(self, failed: aetcd.Client | None = None) -> None:
        """Close the client (only if it is still `failed`, when given: a task that
        reports a loss late must not drop the connection another just made)."""
        if failed is not None and failed is not self._client:
            return
        client, self._client = self._client, None
        self._endpoint += 1  # the next connect tries the next endpoint
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def _new_session(self) -> None:
        """Keep the lease if etcd still has it; else a new lease, the node record
        and the whole published state under it."""
        async with self._session_lock:
            client = await self._connect()
            if self._lease is not None:
                reply = await client.refresh_lease(self._lease)
                if reply is not None and reply.TTL > 0:
                    await self._beat(client)
                    self._up.set()
                    self._dirty.set()
                    return
            path = node_path(self.namespace, self.node.node_id)
            await claim(client, path, self.node.node_id, self.lease_ttl, self.signer)
            lease = await client.lease(self.lease_ttl)
            # The lease counts as ours only once the record is under it: a
            # session that fails here is retried whole, never half kept.
            await client.put(path, self._record(path, lease.id), lease=lease.id)
            self._lease = lease.id
            if self.locations is not None:
                self.locations.new_session(lease.id)
            # The old lease is gone, and with it every key etcd held for us.
            self._in_etcd.clear()
            self.book.dirty = self.book.everything()
            self._ripening.clear()
            self._up.set()
            self._dirty.set()
            log.info(
                "index session lease=%x republish=%d node=%s",
                lease.id,
                len(self.book.dirty),
                self.node.node_id,
            )

    async def set_record(self, record: NodeRecord) -> None:
        """Publish a new record of this node (its peer port, once it serves);
        while etcd is away, the next session puts it."""
        if record.node_id != self.node.node_id:
            raise ValueError("a node keeps its id")
        self.node = record
        if self._up.is_set() and self._lease is not None:
            path = node_path(self.namespace, record.node_id)
            value = self._record(path, self._lease)
            await self._attempt(self._live().put(path, value, lease=self._lease))

    async def _lost(self, error: BaseException, client: aetcd.Client | None = None) -> None:
        if self._up.is_set():
            log.warning("etcd unreachable; serving from the mirror error=%r", error)
        self._up.clear()
        await self._drop_client(client)

    async def _attempt(self, step: Awaitable[object]) -> bool:
        """Run one etcd step. On a lost connection: mark etcd down, return False.

        gRPC cancels the calls of a channel that another task closed; that is a
        lost connection too, unless this task itself is being cancelled.
        """
        client = self._client
        try:
            await step
            return True
        except _LOST as e:
            await self._lost(e, client)
        except asyncio.CancelledError as e:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise
            await self._lost(e, client)
        except Exception as e:
            # Not a known etcd failure: say so loudly, then recover the same way.
            log.exception("index step failed unexpectedly")
            await self._lost(e, client)
        return False

    async def _reconnect(self) -> None:
        """Until etcd answers: back off, try again."""
        delay = 0.05
        while not self._closing and not self._up.is_set():
            if await self._attempt(self._new_session()):
                log.info("etcd reachable again node=%s", self.node.node_id)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    # -- tasks -------------------------------------------------------------
    async def _supervised(self, fn: Callable[[], Awaitable[None]]) -> None:
        """A task never dies silently: on an unexpected error it logs and restarts."""
        while True:
            try:
                await fn()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("index task failed; restarting task=%s", fn.__name__)
                if any(self._inflight):  # a batch the flusher had taken goes back
                    self._retry(*self._inflight)
                    self._inflight = (set(), set())
                await asyncio.sleep(0.5)

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            if not self._up.is_set() or not await self._attempt(self._refresh()):
                await self._reconnect()

    async def _refresh(self) -> None:
        client = self._live()
        reply = await client.refresh_lease(self._lease)
        if reply is None or reply.TTL <= 0:
            self._lease = None  # expired: the next session takes a new one
            raise IndexUnavailable("lease expired")
        await self._beat(client)
        if self._watching and self.mirror.expire():  # records nobody refreshed: dead nodes
            self._update_members()

    async def _beat(self, client: aetcd.Client) -> None:
        """The record again, with a new stamp: what proves this node alive."""
        path = node_path(self.namespace, self.node.node_id)
        await client.put(path, self._record(path, self._lease), lease=self._lease)
        self.beats += 1

    async def _flusher(self) -> None:
        if self.locations is not None:
            await self._send_locations()
            return
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            await asyncio.sleep(self.flush_interval)  # let a burst coalesce
            if not self.book.dirty and not self._ripening:
                continue
            if not self._up.is_set():
                await self._reconnect()
            first, then = self._inflight = self._take()
            try:
                if not await self._attempt(self._write(first, then)):
                    self._retry(first, then)
            finally:
                self._inflight = (set(), set())
                self._wake_when_ripe()

    async def _send_locations(self) -> None:
        """A sharded index's flusher: the changes to their owners, every
        `flush_interval` (etcd up or not: owners are reached directly)."""
        assert self.locations is not None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):  # at least every second: kept shards expire
                    await self._dirty.wait()
            self.locations.expire()
            if not self._dirty.is_set():
                continue
            self._dirty.clear()
            await asyncio.sleep(self.flush_interval)  # let a burst coalesce
            await self.locations.flush()
            if self.locations.pending:
                self._dirty.set()  # what failed goes again

    def _take(self) -> tuple[set[int], set[int]]:
        """The dirty runs (and the ripening ones now due), split into those
        that lost keys (written first) and the rest; the flusher is woken
        when the next young key comes of age."""
        book, now = self.book, time.monotonic()
        for rid, due in list(self._ripening.items()):
            if due <= now or self._hurry:
                del self._ripening[rid]
                book.dirty.add(rid)
        first = {rid for rid in book.dirty if book.shrunk(rid)}
        then = book.dirty - first
        book.take(first | then)
        return first, then

    def _wake_when_ripe(self) -> None:
        if self._wakeup is not None:
            self._wakeup.cancel()
        if self._ripening:
            delay = min(self._ripening.values()) - time.monotonic()
            self._wakeup = asyncio.get_running_loop().call_later(delay, self._dirty.set)

    def _cutoff(self) -> float:
        return time.monotonic() - (0.0 if self._hurry else self.publish_after)

    def _retry(self, first: set[int], then: set[int]) -> None:
        """A failed write may have committed in part: every run in it may be in
        etcd now, and each goes back to dirty, to be written as it stands then
        (a later change, or a new lease's republish, is never undone by old
        values); the runs that lost keys still go first."""
        self._in_etcd.update(first | then)
        self.book.dirty |= first | then
        for rid in first:
            self.book.mark_shrunk(rid)
        self._dirty.set()

    async def _write(self, first: set[int], then: set[int]) -> None:
        """Both phases' operations are built before the first await: the
        records are one snapshot of the book, in which no key is in two runs
        (a publish() while phase one is in flight must not reach phase two)."""
        client = self._live()
        phases = [self._ops(client, phase) for phase in (first, then)]
        for ops, sent in phases:
            chunks = [ops[i : i + MAX_TXN_OPS] for i in range(0, len(ops), MAX_TXN_OPS)]
            # A few transactions in flight at once: etcd batches them to disk together.
            for i in range(0, len(chunks), 4):
                await asyncio.gather(
                    *(
                        client.transaction(compare=[], success=c, failure=[])
                        for c in chunks[i : i + 4]
                    )
                )
            self.writes += len(ops)
            for rid, put in sent:
                if put:
                    self._in_etcd.add(rid)
                else:
                    self._in_etcd.discard(rid)

    def _ops(self, client: aetcd.Client, rids: set[int]) -> tuple[list, list[tuple[int, bool]]]:
        """The puts and deletes that bring etcd to these runs' records now, and
        (run, put or not) for each; runs holding keys too young are noted
        as ripening."""
        tx, book, lease, cutoff = client.transactions, self.book, self._lease, self._cutoff()
        ops, sent = [], []
        for rid in rids:
            record = book.record(rid, cutoff)
            young = book.youngest_unshown(rid, cutoff)
            if young is not None:
                self._ripening[rid] = young + self.publish_after
            else:
                self._ripening.pop(rid, None)
            path = run_path(self.namespace, self.node.node_id, rid)
            if record is not None:
                value = self._value(path, record.encode(), lease)
                ops.append(tx.put(path, value, lease=lease))
                self.bytes_written += len(path) + len(value)
            elif rid in self._in_etcd:
                ops.append(tx.delete(path))
            else:
                continue
            sent.append((rid, record is not None))
        return ops, sent

    def _value(self, path: bytes, value: bytes, lease: int | None, valid: int = 0) -> bytes:
        """`value` signed for `path` under `lease` in this session (a node
        record with a validity of `valid` ms)."""
        if self.signer is None:
            return value
        s = self.session
        return self.signer.sign(path, value, lease or 0, s.nonce, s.stamp(), valid)

    def _record(self, path: bytes, lease: int | None) -> bytes:
        return self._value(path, self.node.encode(), lease, self.lease_ttl * 1000)

    async def _watcher(self) -> None:
        first = True
        while True:
            await self._up.wait()
            # After any break: is etcd's history still ours? (wiped, replaced)
            if (first or await self._attempt(self._catch_up())) and await self._attempt(
                self._watch()
            ):
                first = False
                continue
            first = False
            await self._reconnect()

    async def _watch(self) -> None:
        """Feed the mirror until the stream ends or breaks. It starts *at* the
        mirror's revision, not after it: replaying one revision changes nothing,
        and etcd 3.5.1 drops deletes of a revision compacted exactly at it
        without reporting the compaction (etcd issue 18089)."""
        try:
            watch = await self._live().watch_prefix(
                self._watch_prefix, start_revision=max(1, self.mirror.revision)
            )
            async for event in watch:
                kv = event.kv
                if event.kind == "PUT":
                    # a record the fleet did not sign changes nobody's lease either
                    if self.mirror.put(kv.key, kv.value, kv.mod_revision, kv.lease):
                        self._note_lease(kv.key, kv.lease)
                else:
                    self.mirror.delete(kv.key, kv.mod_revision)
                    self._note_lease(kv.key, None)
                self._update_members()
        except aetcd.exceptions.RevisionCompactedError:
            log.info("watch revision compacted; re-reading the namespace")
            await self._resync()

    async def _catch_up(self) -> None:
        """After a break: resume the watch, unless etcd's history no longer
        reaches back to the mirror's revision (a wiped or replaced cluster).
        A sharded index re-reads the node records every time: they are few,
        and with no runs written the revisions move too little to tell a
        wiped etcd (whose revisions start again) from the one it had."""
        if self.locations is not None:
            await self._resync()
            return
        got = await self._live().get(node_path(self.namespace, self.node.node_id))
        header = got.header if got is not None else None
        if (
            header is None
            or header.revision < self.mirror.revision
            or header.cluster_id != self._cluster_id
        ):
            await self._resync()

    async def _resync(self) -> None:
        """Replace the mirror with a fresh range read of the namespace; lookups see
        the old view until the new one is complete."""
        revision, cluster, kvs = await read_prefix(self._live(), self._watch_prefix)
        fresh = IndexMirror(self.namespace, self.signer)
        signed = [kv for kv in _records_first(kvs, self.namespace) if fresh.put(*_put_args(kv))]
        fresh.revision = revision
        self.mirror.adopt(fresh)
        self._cluster_id = cluster
        self._leases.clear()
        for kv in signed:
            self._note_lease(kv.key, kv.lease)
        self._update_members()

    def _note_lease(self, path: bytes, lease: int | None) -> None:
        """The lease a node's record is under (None: the record went). This
        node's own record gone, or under a lease not ours (an etcd writer
        deleted it, or put it back under a lease of its own), while our
        lease stands: the record goes back, and the owners get everything
        again (they dropped it with the session they saw end)."""
        if self.locations is None or not path.startswith(self._watch_prefix):
            return
        node = path[len(self._watch_prefix) :].decode(errors="replace")
        if lease:
            self._leases[node] = lease
        else:
            self._leases.pop(node, None)
        ours = self._lease
        if node == self.node.node_id and ours and lease != ours and not self._closing:
            log.warning("this node's record was changed by someone else; putting it back")
            self._leases[node] = ours  # as it will be
            self.locations.new_session(ours)
            self._dirty.set()
            task = asyncio.create_task(self.set_record(self.node))
            self._tasks.append(task)

    def _update_members(self) -> None:
        """A sharded index's ring from the node records the mirror believes:
        every node that serves (has a peer port) and shares one of this
        node's fingerprints, with the lease its record is under."""
        if self.locations is None:
            return
        mine = set(self.node.fingerprints)
        self.locations.set_members(
            {
                n: self._leases[n]
                for n, r in self.mirror.nodes.items()
                if r.rpc_port and n in self._leases and (not mine or mine & set(r.fingerprints))
            }
        )
        if self.locations.pending:  # moved shards' keys for their new owners
            self._dirty.set()


async def snapshot(
    endpoints: Sequence[str],
    namespace: str,
    signer: IndexSigner | None = None,
    timeout: float = 5.0,
    tls: EtcdTls | None = None,
) -> IndexMirror:
    """A one-off read of a namespace (for `kvbm status`): the first endpoint
    that answers; with a `signer`, only what the fleet signed."""
    last: BaseException | None = None
    for endpoint in endpoints:
        client = open_client(endpoint, timeout, tls)
        try:
            _, _, kvs = await read_prefix(client, namespace_prefix(namespace))
        except _LOST as e:
            last = e
            continue
        finally:
            with contextlib.suppress(*_ETCD_ERRORS):
                await client.close()
        mirror = IndexMirror(namespace, signer)
        for kv in _records_first(kvs, namespace):
            mirror.put(*_put_args(kv))
        return mirror
    raise IndexUnavailable(f"cannot reach etcd at {list(endpoints)}: {last!r}")


def _records_first(kvs: list, namespace: str) -> list:
    """A range read's keys, node records first: a run is shown only with the
    record of its session (discovery/mirror.py)."""
    records = nodes_prefix(namespace)
    return sorted(kvs, key=lambda kv: not kv.key.startswith(records))


def _put_args(kv: object) -> tuple[bytes, bytes, int, int]:
    return kv.key, kv.value, kv.mod_revision, kv.lease  # type: ignore[attr-defined]
