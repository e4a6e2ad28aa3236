"""The sharded index's calls between nodes (discovery/sharded.py), carried by
the peer RPC: the owner's side registered with the node's peer server
(`owner_calls`), the holder's and asker's side over the node's peer pool
(`OwnerClient`). The transport carries them without knowing what they mean;
discovery never imports the transport: they meet here.

- `place`: the caller holds the keys at these places (discovery/owners.py)
  in these tiers now (None: no longer), in its session (the etcd lease of
  its record). Answered {"ok": bool}; False: the owner does not see that
  session on the caller's record (yet, or any more).
- `locate`: who holds the keys at these places, as runs of
  (n, node -> tier name) for n consecutive keys.
Places travel as 64-bit little-endian integers, tiers as their names.
"""

from __future__ import annotations

import logging

import numpy as np

from discovery.records import check_node_id
from discovery.sharded import MAX_PLACES_PER_CALL, ShardedLocations
from discovery.tier import Tier
from kvbm.node.peer_pool import PeerPool
from transport.errors import ProtocolError, TransportError
from transport.frames import MAX_FIELDS
from transport.peer_rpc import PeerCall, PeerClient

log = logging.getLogger("kvbm.node")
INDEX_CALLS = ("place", "locate")  # what a node of a sharded index registers
INDEX_CALL_TIMEOUT_S = 1.0  # a sharded index's call to an owner (a lookup waits on it)
WARM_TIMEOUT_S = 5.0  # connecting ahead to a new owner (nobody waits on it)
# Holders of one key in a `locate` answer: a frame's map holds no more (an
# honest owner names at most discovery.sharded.MAX_HOLDERS_ANSWERED).
MAX_HOLDERS_ON_WIRE = MAX_FIELDS


# -- the owner's side ----------------------------------------------------------
def owner_calls(owner: ShardedLocations) -> dict[str, PeerCall]:
    """The calls a node that owns shards serves, for its peer server's table."""

    async def place_call(peer: str, body: dict) -> dict:
        xs, tiers, session = _places(body), body.get("tiers"), body.get("session")
        if not isinstance(tiers, list) or len(tiers) != len(xs):
            raise ProtocolError("place needs one tier per key")
        if not all(t is None or isinstance(t, str) for t in tiers):
            raise ProtocolError("a tier that is not a name")
        if type(session) is not int or not 0 < session < 2**64:
            raise ProtocolError("place needs a session (the lease of the node's record)")
        return {"ok": owner.place(peer, session, xs, tiers)}

    async def locate_call(peer: str, body: dict) -> dict:
        return {"runs": owner.holders(_places(body), peer)}

    return {"place": place_call, "locate": locate_call}


def _places(body: dict) -> np.ndarray:
    """A sharded index's keys, by place (64 bits each, little-endian)."""
    raw = body.get("places")
    if not isinstance(raw, bytes) or len(raw) % 8 or len(raw) > 8 * MAX_PLACES_PER_CALL:
        raise ProtocolError("bad place list")
    return np.frombuffer(raw, "<u8").astype(np.uint64, copy=False)


def _wire_places(xs: np.ndarray) -> bytes:
    return xs.astype("<u8", copy=False).tobytes()


# -- the caller's side ---------------------------------------------------------
async def place(
    client: PeerClient, session: int, xs: np.ndarray, tiers: list[str | None], timeout: float
) -> bool:
    """Tell the peer, an owner of these keys' shards, which of them (by place)
    this node holds (tier names; None: no longer). False: the owner does not
    see this session (the lease of this node's record) on the record yet, or
    any more."""
    body = {"places": _wire_places(xs), "tiers": tiers, "session": session}
    reply = await client.call("place", body, timeout)
    return reply.get("ok") is True


async def locate(
    client: PeerClient, xs: np.ndarray, timeout: float
) -> list[tuple[int, dict[str, str]]]:
    """Who holds each key (by place), as the peer, their owner, knows: runs of
    (n, node -> tier name) for n consecutive keys. The shape is checked
    here; names and tiers are the caller's to check."""
    reply = await client.call("locate", {"places": _wire_places(xs)}, timeout)
    runs = reply.get("runs")
    if not isinstance(runs, list) or len(runs) > len(xs):
        raise ProtocolError("locate answered for other keys")
    total = 0
    for run in runs:
        if not isinstance(run, list) or len(run) != 2:
            raise ProtocolError("locate answered with a bad run")
        n, h = run
        if type(n) is not int or n < 1 or not isinstance(h, dict) or len(h) > MAX_HOLDERS_ON_WIRE:
            raise ProtocolError("locate answered with a bad run")
        if not all(isinstance(k, str) and isinstance(t, str) for k, t in h.items()):
            raise ProtocolError("locate answered with a bad holder list")
        total += n
    if total != len(xs):
        raise ProtocolError("locate answered for other keys")
    return [(n, h) for n, h in runs]


class OwnerClient:
    """The calls a node of a sharded index makes to owners, over its peer
    pool: the `send`, `ask` and `warm` of discovery.sharded.ShardedLocations.
    A call that fails is an answer too: not placed (sent again later), or
    not known (nobody, for those keys)."""

    def __init__(self, pool: PeerPool, timeout_s: float = INDEX_CALL_TIMEOUT_S) -> None:
        self.pool = pool
        self.timeout_s = timeout_s

    async def place(
        self, owner: str, session: int, xs: np.ndarray, tiers: list[Tier | None]
    ) -> bool:
        """Tell `owner` which of its keys (by place) this node holds; False
        when it could not be told (unreachable, refused): the caller sends
        them again later."""
        client = await self.pool.client(owner, self.timeout_s)
        if client is None:
            return False
        names = [None if t is None else t.value for t in tiers]
        try:
            return await place(client, session, xs, names, self.timeout_s)
        except (TimeoutError, TransportError, OSError) as e:
            log.info("locations not placed owner=%s error=%r", owner, e)
            return False

    async def locate(self, owner: str, xs: np.ndarray) -> list[tuple[int, dict[str, Tier]]] | None:
        """Who holds each key (by place), as `owner` knows, in runs of keys;
        None when it did not answer (or answered what is not a node id and
        a tier)."""
        client = await self.pool.client(owner, self.timeout_s)
        if client is None:
            return None
        try:
            found = await locate(client, xs, self.timeout_s)
            return [(n, {check_node_id(p): Tier(t) for p, t in h.items()}) for n, h in found]
        except (TimeoutError, TransportError, OSError, ValueError) as e:
            log.info("lookup not answered owner=%s error=%r", owner, e)
            return None

    async def warm(self, peer: str) -> None:
        """Connect to `peer` now, so that its first call finds a connection."""
        await self.pool.client(peer, WARM_TIMEOUT_S)
