"""Who is a live node: what a node's record must prove, and who may take a
node id.

An etcd writer without the fleet's secret cannot sign, but it can copy: read
a node's signed record and runs, and put them back after the node died,
under a lease of its own or, once the old lease expired, under a lease it
grants itself with the old lease's id (etcd's LeaseGrant takes an ID). A
signature over the lease id (discovery/signing.py) turns away the first; the
second needs something a dead node cannot have written: a record fresh in
time. So every node's record carries its session nonce (random, per start)
and a stamp (wall clock, ms) with a validity of one lease TTL, and the node
writes it again with each keepalive, every TTL/3 (`Session`). A reader
believes a record only within its validity (clocks within
signing.CLOCK_SKEW_MS of each other: NTP keeps them far closer) and shows
only the runs of the session of the record it believes: a dead node's
copies are not believed from TTL after its last keepalive on, which is when
etcd itself would have dropped them.

Why this design: its etcd cost is one small put (the record, ~200 bytes)
per node per TTL/3, beside the keepalive the node sends then anyway, and
nothing per block: runs are written as before, in batches, carrying 28
bytes more each. The alternatives cost more: a challenge over the peer RPC
needs every reader to call every node it has seen (and again whenever a
record reappears: N^2 calls at each fleet start, and none possible for
`kvbm status`), and tracking stamps per reader without clocks leaves a
fresh reader to believe a replayed sequence of old stamps. A claim to a
node id needs the same proof (`claim`): a record of that id with a stamp
written after the claim began looking, which only the live owner can sign.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

import aetcd
import aetcd.exceptions

from discovery.errors import DuplicateNode
from discovery.records import NodeRecord
from discovery.signing import CLOCK_SKEW_MS, NONCE_BYTES, IndexSigner, Signed, wall_ms

log = logging.getLogger("discovery.etcd")
PROOF_MARGIN_S = 2.0  # past one keepalive period, how long a claim waits for the owner's proof


class Session:
    """One start of a node: its nonce, and stamps that rise (a wall clock
    stepped back by NTP does not make a later value look older)."""

    def __init__(self) -> None:
        self.nonce = os.urandom(NONCE_BYTES)
        self._last = 0

    def stamp(self) -> int:
        self._last = max(self._last + 1, wall_ms())
        return self._last


async def claim(
    client: aetcd.Client,
    path: bytes,
    node_id: str,
    lease_ttl: int,
    signer: IndexSigner | None,
) -> None:
    """Before a node's record goes in: raises DuplicateNode if a live node
    holds this id. A record of our id is a live node's only when it proves
    it: signed under the lease it is under, and written again (a newer stamp,
    made after this claim began) within one keepalive period, which a copy
    put back by an etcd writer never is. Anything else is ours from a
    session that died (a restart within the TTL: that lease is revoked, and
    every key of the old session with it), or not believed: ours replaces
    it. Costs up to one keepalive period and PROOF_MARGIN_S when a fresh
    record of the id is there (a starting daemon waits longer for its join:
    INDEX_FIRST_WAIT_S more than the period)."""
    got = await client.get(path)
    if got is None or not got.lease:
        return
    if signer is None:
        await _claim_unsigned(client, got, node_id)
        return
    try:
        first = signer.open(path, got.value, got.lease)
        NodeRecord.decode(first.value)
    except ValueError:
        log.info("replacing a record of this node id not signed under its lease")
        return
    began, after = wall_ms(), max(first.stamp, wall_ms() - CLOCK_SKEW_MS)
    # a live owner writes its record every TTL/3: look that long, and a margin
    # for a busy owner or etcd, asking a few times a second
    until = asyncio.get_running_loop().time() + lease_ttl / 3 + PROOF_MARGIN_S
    while first.fresh(began) and asyncio.get_running_loop().time() < until:
        await asyncio.sleep(0.25)
        proof = await _proof(client, path, signer, after)
        if proof is not None:
            other = NodeRecord.decode(proof.value)
            raise DuplicateNode(f"node id {node_id!r} is held by a live node at {_where(other)}")
    log.info("taking over this node id from a session that died lease=%x", got.lease)
    with contextlib.suppress(aetcd.exceptions.ClientError):
        await client.revoke_lease(got.lease)


async def _proof(
    client: aetcd.Client, path: bytes, signer: IndexSigner, after: int
) -> Signed | None:
    """The record under `path` if its owner wrote it after `after` (ms)."""
    got = await client.get(path)
    if got is None or not got.lease:
        return None
    try:
        signed = signer.open(path, got.value, got.lease)
    except ValueError:
        return None
    return signed if signed.stamp > after and signed.fresh() else None


def _where(record: NodeRecord) -> str:
    where = f"{record.address}:{record.rpc_port}" if record.rpc_port else record.address
    return f"{where}; give each node its own node_id"


async def _claim_unsigned(client: aetcd.Client, got: object, node_id: str) -> None:
    """An index without a signer (tests, tools): a record under a lease that
    someone keeps alive is a live node's."""
    try:
        other = NodeRecord.decode(got.value)  # type: ignore[attr-defined]
    except ValueError:
        return
    lease = got.lease  # type: ignore[attr-defined]
    if await _lease_alive(client, lease):
        raise DuplicateNode(f"node id {node_id!r} is held by a live node at {_where(other)}")
    log.info("taking over this node id from a session that died lease=%x", lease)
    with contextlib.suppress(aetcd.exceptions.ClientError):
        await client.revoke_lease(lease)


async def _lease_alive(client: aetcd.Client, lease: int) -> bool:
    """Whether someone keeps `lease` alive: its TTL is refreshed within one
    keepalive period (a third of it, as nodes refresh theirs)."""
    info = await client.get_lease_info(lease, keys=False)
    if info.TTL <= 0:
        return False
    wait = info.grantedTTL / 3 + 0.5
    await asyncio.sleep(wait)
    later = await client.get_lease_info(lease, keys=False)
    unrefreshed = max(0, info.TTL - wait + 1)  # what is left if nobody refreshed it
    return unrefreshed < later.TTL
