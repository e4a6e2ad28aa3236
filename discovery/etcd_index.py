"""The etcd-backed index of one node in one namespace: this node's record
under its lease (discovery/etcd_session.py), a watch that mirrors the other
nodes' records, and a layout for block locations, chosen at construction
(discovery/index.py): runs in etcd, mirrored by every node
(discovery/mirror_layout.py), or sent to the keys' owners
(discovery/sharded_layout.py).

Three tasks, each owning one stream: `_keepalive` refreshes the lease and
the record's stamp every TTL/3 (discovery/liveness.py: what makes a record
believed), and stops believing records past their validity; the layout's
`run` sends what was published; `_watcher` feeds the mirror. When etcd is
unreachable, lookups go on from the mirror, changes accumulate (coalesced),
and when etcd is back the node keeps its lease if it survived, or takes a
new one and republishes its whole state. The watch resumes at the last
revision seen + 1, or re-reads the watched keys when that revision was
compacted away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

import aetcd
import aetcd.exceptions

from discovery.errors import IndexUnavailable
from discovery.etcd_client import open_client, read_prefix
from discovery.etcd_session import ETCD_ERRORS, LOST, EtcdSession
from discovery.index import LocationLayout
from discovery.mirror import Follower, IndexMirror
from discovery.mirror_layout import MirrorLayout
from discovery.records import LookupResult, NodeRecord
from discovery.schema import namespace_prefix, node_path, nodes_prefix
from discovery.sharded import ShardedLocations
from discovery.sharded_layout import ShardedLayout
from discovery.signing import IndexSigner
from discovery.tier import Tier
from discovery.tls import EtcdTls

log = logging.getLogger("discovery.etcd")


class EtcdIndex:
    """Invariants: the session's lease is the one this node's record is
    under, and every change published reaches the layout at once (and
    etcd, or the owners, at its next flush); `mirror.revision` is the last
    revision the watch applied, so a watch resumes after it."""

    def __init__(self, session: EtcdSession, layout: LocationLayout, watch: bool = True) -> None:
        """`watch=False` makes a publisher without a mirror (load generators).
        With a signer in the session, only values signed by the fleet reach
        the mirror."""
        self.session = session
        self.layout = layout
        self.mirror = IndexMirror(session.namespace, session.signer)
        self._tasks: list[asyncio.Task] = []
        self._watching = watch
        self._cluster_id: int | None = None

    @property
    def namespace(self) -> str:
        return self.session.namespace

    @property
    def node(self) -> NodeRecord:
        return self.session.node

    @property
    def connected(self) -> bool:
        return self.session.up.is_set()

    # -- BlockIndex (discovery/index.py) -------------------------------------
    async def start(self) -> None:
        """Connect, register, read the namespace, and start the three tasks.
        Raises IndexUnavailable if etcd cannot be reached at all now."""
        try:
            await self._new_session()
            if self._watching:
                await self._resync()
        except LOST as e:
            await self.session.drop_client()
            raise IndexUnavailable(f"cannot reach etcd at {self.session.endpoints}: {e!r}") from e
        except BaseException:
            await self.session.drop_client()
            raise
        tasks = [self._keepalive, self._send] + ([self._watcher] if self._watching else [])
        for fn in tasks:
            name = f"kvbm-index-{fn.__name__.strip('_')}"
            self._tasks.append(asyncio.create_task(self._supervised(fn), name=name))

    async def set_record(self, record: NodeRecord) -> None:
        await self.session.set_record(record)

    def publish(
        self,
        changes: Mapping[bytes, Tier | None],
        removes: Iterable[bytes] = (),
        anchors: Mapping[bytes, int] | None = None,
    ) -> None:
        self.layout.publish({**dict.fromkeys(removes), **changes}, anchors)

    async def lookup(
        self, keys: Sequence[bytes], anchors: Sequence[int] | None = None
    ) -> LookupResult:
        return await self.layout.lookup(keys, anchors, self.mirror)

    def peer(self, node_id: str) -> NodeRecord | None:
        return self.mirror.nodes.get(node_id)

    def peers(self) -> list[str]:
        return sorted(self.mirror.nodes)

    def follow(self, follower: Follower) -> bool:
        return self.layout.follow(self.mirror, follower)

    @property
    def state(self) -> str:
        return "etcd up" if self.connected else "etcd down"

    @property
    def refused(self) -> tuple[int, int]:
        m = self.mirror
        return m.rejected + m.stale, m.over_cap

    def stats(self) -> dict:
        return self.layout.stats(self.mirror)

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every change so far is out, young runs included (or
        raise TimeoutError)."""
        async with asyncio.timeout(timeout):
            await self.layout.flush()

    async def close(self, revoke: bool = True) -> None:
        """Flush what can be flushed, revoke the lease (so peers forget this node
        at once rather than after the TTL), stop the tasks."""
        self.session.closing = True
        if self.connected:
            with contextlib.suppress(TimeoutError):
                await self.flush(timeout=self.session.timeout)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if revoke:
            await self.session.revoke()
        else:
            await self.session.drop_client()

    # -- the session -----------------------------------------------------------
    async def _new_session(self) -> None:
        """Keep the lease if etcd still has it; else a new lease, the node record
        and the whole published state under it."""
        lease = await self.session.open()
        if lease is None:
            self.layout.dirty.set()
            return
        republish = self.layout.new_lease(lease)
        log.info("index session lease=%x republish=%d node=%s", lease, republish, self.node.node_id)

    async def _reconnect(self) -> None:
        """Until etcd answers: back off, try again."""
        delay = 0.05
        session = self.session
        while not session.closing and not session.up.is_set():
            if await session.attempt(self._new_session()):
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
                self.layout.recover()
                await asyncio.sleep(0.5)

    async def _keepalive(self) -> None:
        session = self.session
        while True:
            await asyncio.sleep(session.lease_ttl / 3)
            if not session.up.is_set() or not await session.attempt(self._refresh()):
                await self._reconnect()

    async def _refresh(self) -> None:
        await self.session.refresh()
        if self._watching and self.mirror.expire():  # records nobody refreshed: dead nodes
            self.layout.records_changed(self.mirror)

    async def _send(self) -> None:
        await self.layout.run(self._reconnect)

    async def _watcher(self) -> None:
        first = True
        while True:
            await self.session.up.wait()
            # After any break: is etcd's history still ours? (wiped, replaced)
            if (
                first or await self.session.attempt(self._catch_up())
            ) and await self.session.attempt(self._watch()):
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
            watch = await self.session.live().watch_prefix(
                self.layout.watch_prefix, start_revision=max(1, self.mirror.revision)
            )
            async for event in watch:
                kv = event.kv
                if event.kind == "PUT":
                    # a record the fleet did not sign changes nobody's lease either
                    if self.mirror.put(kv.key, kv.value, kv.mod_revision, kv.lease):
                        self._record_seen(kv.key, kv.lease)
                else:
                    self.mirror.delete(kv.key, kv.mod_revision)
                    self._record_seen(kv.key, None)
                self.layout.records_changed(self.mirror)
        except aetcd.exceptions.RevisionCompactedError:
            log.info("watch revision compacted; re-reading the namespace")
            await self._resync()

    async def _catch_up(self) -> None:
        """After a break: resume the watch, unless etcd's history no longer
        reaches back to the mirror's revision (a wiped or replaced cluster),
        or the layout re-reads after every break."""
        if self.layout.resync_after_break:
            await self._resync()
            return
        got = await self.session.live().get(node_path(self.namespace, self.node.node_id))
        header = got.header if got is not None else None
        if (
            header is None
            or header.revision < self.mirror.revision
            or header.cluster_id != self._cluster_id
        ):
            await self._resync()

    async def _resync(self) -> None:
        """Replace the mirror with a fresh range read of the watched keys;
        lookups see the old view until the new one is complete."""
        revision, cluster, kvs = await read_prefix(self.session.live(), self.layout.watch_prefix)
        fresh = IndexMirror(self.namespace, self.session.signer)
        signed = [kv for kv in _records_first(kvs, self.namespace) if fresh.put(*_put_args(kv))]
        fresh.revision = revision
        self.mirror.adopt(fresh)
        self._cluster_id = cluster
        self.layout.reread()
        for kv in signed:
            self._record_seen(kv.key, kv.lease)
        self.layout.records_changed(self.mirror)

    def _record_seen(self, path: bytes, lease: int | None) -> None:
        """The layout learns each record's lease; where this node's own record
        was taken from it, the record goes back."""
        if self.layout.record_seen(path, lease):
            self._tasks.append(asyncio.create_task(self.session.set_record(self.node)))


def mirror_index(
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
) -> EtcdIndex:
    """An etcd index of the mirror layout: runs in etcd, every node's in a
    mirror here. `publish_after`: a key is published once held this long."""
    session = EtcdSession(endpoints, namespace, node, lease_ttl, timeout, signer, tls)
    return EtcdIndex(session, MirrorLayout(session, flush_interval, publish_after), watch)


def sharded_index(
    endpoints: Sequence[str],
    namespace: str,
    node: NodeRecord,
    locations: ShardedLocations,
    lease_ttl: int = 10,
    flush_interval: float = 0.005,
    timeout: float = 2.0,
    signer: IndexSigner | None = None,
    tls: EtcdTls | None = None,
) -> EtcdIndex:
    """An etcd index of the sharded layout: node records in etcd, locations
    with their owners (`locations`: this node's share, and its calls)."""
    session = EtcdSession(endpoints, namespace, node, lease_ttl, timeout, signer, tls)
    return EtcdIndex(session, ShardedLayout(session, locations, flush_interval))


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
        except LOST as e:
            last = e
            continue
        finally:
            with contextlib.suppress(*ETCD_ERRORS):
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
