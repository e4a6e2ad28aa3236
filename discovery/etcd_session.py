"""One node's session with etcd: the connection, the lease, and the node's
record under it (discovery/liveness.py: what makes a record believed).

The session keeps its lease while etcd does: after a break it refreshes the
old lease if etcd still has it, or takes a new one and puts the record under
it (the index then republishes everything: the old lease's keys are gone).
Every value written is signed for its path, lease and session
(discovery/signing.py). Foreign errors are translated in one place
(`attempt`): any of them means etcd is gone for now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Sequence

import aetcd
import aetcd.exceptions

from discovery.errors import IndexUnavailable
from discovery.etcd_client import open_client
from discovery.liveness import Session, claim
from discovery.records import NodeRecord
from discovery.schema import node_path
from discovery.signing import IndexSigner
from discovery.tls import EtcdTls

log = logging.getLogger("discovery.etcd")

ETCD_ERRORS = (aetcd.exceptions.ClientError, OSError, asyncio.TimeoutError)
LOST = (*ETCD_ERRORS, IndexUnavailable)  # any of these: etcd is gone for now


class EtcdSession:
    """Invariants: `lease` is ours only once the node's record is under it
    (a session that fails half way is retried whole); `up` is set while the
    last step against etcd succeeded; `client` is the one connection, and a
    late report of a loss never drops a newer one."""

    def __init__(
        self,
        endpoints: Sequence[str],
        namespace: str,
        node: NodeRecord,
        lease_ttl: int = 10,
        timeout: float = 2.0,
        signer: IndexSigner | None = None,
        tls: EtcdTls | None = None,
    ) -> None:
        """`signer`: every value written is signed (a node always has one).
        `tls`: etcd is reached in TLS, with this node's client certificate."""
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        if lease_ttl < 2:
            raise ValueError("lease_ttl must be at least 2 seconds")
        self.endpoints = list(endpoints)
        self.namespace = namespace
        self.node = node
        self.lease_ttl = lease_ttl
        self.timeout = timeout
        self.signer = signer
        self.tls = tls
        self.stamps = Session()  # this session's nonce and stamps, for signed values
        self.beats = 0  # the record written again, with a keepalive
        self.lease: int | None = None
        self.up = asyncio.Event()
        self.closing = False
        self._client: aetcd.Client | None = None
        self._endpoint = 0
        self._lock = asyncio.Lock()

    # -- the connection ----------------------------------------------------
    async def connect(self) -> aetcd.Client:
        if self._client is None:
            endpoint = self.endpoints[self._endpoint % len(self.endpoints)]
            self._client = open_client(endpoint, self.timeout, self.tls)
            await self._client.connect()
        return self._client

    def live(self) -> aetcd.Client:
        if self._client is None:
            raise IndexUnavailable("no etcd connection")
        return self._client

    async def drop_client(self, failed: aetcd.Client | None = None) -> None:
        """Close the client (only if it is still `failed`, when given: a task that
        reports a loss late must not drop the connection another just made)."""
        if failed is not None and failed is not self._client:
            return
        client, self._client = self._client, None
        self._endpoint += 1  # the next connect tries the next endpoint
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def attempt(self, step: Awaitable[object]) -> bool:
        """Run one etcd step. On a lost connection: mark etcd down, return False.

        gRPC cancels the calls of a channel that another task closed; that is a
        lost connection too, unless this task itself is being cancelled.
        """
        client = self._client
        try:
            await step
            return True
        except (asyncio.CancelledError, Exception) as e:
            # A task being cancelled stops here whatever the step raised: the
            # etcd client turns a cancellation inside a watch into its own error,
            # and a cancellation swallowed here left `close` waiting forever.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError from e
            if isinstance(e, (asyncio.CancelledError, *LOST)):
                await self._lost(e, client)
            else:
                # Not a known etcd failure: say so loudly, then recover the same way.
                log.exception("index step failed unexpectedly")
                await self._lost(e, client)
        return False

    async def _lost(self, error: BaseException, client: aetcd.Client | None = None) -> None:
        if self.up.is_set():
            log.warning("etcd unreachable; serving from the mirror error=%r", error)
        self.up.clear()
        await self.drop_client(client)

    # -- the lease and the record --------------------------------------------
    async def open(self) -> int | None:
        """Keep the lease if etcd still has it (None); else a new lease with
        the node record under it, whose id is returned (the caller republishes
        everything: the old lease's keys are gone with it)."""
        async with self._lock:
            client = await self.connect()
            if self.lease is not None:
                reply = await client.refresh_lease(self.lease)
                if reply is not None and reply.TTL > 0:
                    await self.beat(client)
                    self.up.set()
                    return None
            path = node_path(self.namespace, self.node.node_id)
            await claim(client, path, self.node.node_id, self.lease_ttl, self.signer)
            lease = await client.lease(self.lease_ttl)
            # The lease counts as ours only once the record is under it: a
            # session that fails here is retried whole, never half kept.
            await client.put(path, self.record(path, lease.id), lease=lease.id)
            self.lease = lease.id
            self.up.set()
            return lease.id

    async def refresh(self) -> None:
        """Refresh the lease and the record's stamp (IndexUnavailable when the
        lease has expired: the next `open` takes a new one)."""
        client = self.live()
        reply = await client.refresh_lease(self.lease)
        if reply is None or reply.TTL <= 0:
            self.lease = None  # expired: the next session takes a new one
            raise IndexUnavailable("lease expired")
        await self.beat(client)

    async def beat(self, client: aetcd.Client) -> None:
        """The record again, with a new stamp: what proves this node alive."""
        path = node_path(self.namespace, self.node.node_id)
        await client.put(path, self.record(path, self.lease), lease=self.lease)
        self.beats += 1

    async def set_record(self, record: NodeRecord) -> None:
        """Publish a new record of this node (its peer port, once it serves);
        while etcd is away, the next session puts it."""
        if record.node_id != self.node.node_id:
            raise ValueError("a node keeps its id")
        self.node = record
        if self.up.is_set() and self.lease is not None:
            path = node_path(self.namespace, record.node_id)
            value = self.record(path, self.lease)
            await self.attempt(self.live().put(path, value, lease=self.lease))

    async def revoke(self) -> None:
        """Revoke the lease (peers forget this node at once rather than after
        the TTL) and close the connection."""
        if self.lease is not None and self._client is not None:
            with contextlib.suppress(*ETCD_ERRORS):
                await asyncio.wait_for(self._client.revoke_lease(self.lease), self.timeout)
        await self.drop_client()

    # -- signed values -------------------------------------------------------
    def value(self, path: bytes, value: bytes, lease: int | None, valid: int = 0) -> bytes:
        """`value` signed for `path` under `lease` in this session (a node
        record with a validity of `valid` ms)."""
        if self.signer is None:
            return value
        s = self.stamps
        return self.signer.sign(path, value, lease or 0, s.nonce, s.stamp(), valid)

    def record(self, path: bytes, lease: int | None) -> bytes:
        return self.value(path, self.node.encode(), lease, self.lease_ttl * 1000)
