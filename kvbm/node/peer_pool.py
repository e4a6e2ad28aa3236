"""The node's clients to its peers: one connection per peer, opened on first
use, dropped when it fails, and a peer that failed left alone for a while.
The calls beyond pulls (a sharded index's: kvbm/node/index_calls.py) go
through `client`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection

from discovery.records import NodeRecord
from kvbm.versions import THIS, Compatibility
from transport.agent import Agent
from transport.block_ports import BlockSink
from transport.errors import TransportError, VersionError
from transport.peer_rpc import PeerClient, pull

log = logging.getLogger("kvbm.node")


class PeerPool:
    """Invariants: `clients` holds at most one client per peer; a client that
    is dropped closes in the background, and `close()` waits for it; a peer
    in `avoided` is not asked again before its time. Until `open` (the node
    serves no engine yet, so it has no NIXL agent, nor a layout fingerprint)
    and in a node with no fleet, no peer is reached."""

    def __init__(
        self,
        node_id: str,
        secret: bytes,
        local_host: str,
        record: Callable[[str], NodeRecord | None],
        backoff_s: float,
        calls: Collection[str] = (),
        versions: Compatibility = THIS,
    ) -> None:
        """`record`: a peer's record, as the index has it now. `calls`: the
        calls beyond pins this node makes (those its peers register).
        `versions`: the node's protocol version and its rule for peers'
        (kvbm/versions.py): a peer whose record or hello it refuses is not
        connected to, and left alone as an unreachable one is."""
        self.node_id = node_id  # who we are to peers
        self.agent: Agent | None = None
        self.secret = secret
        self.fingerprint = 0
        self.local_host = local_host  # connections leave from the node's own address
        self.record = record
        self.backoff_s = backoff_s
        self.calls = tuple(calls)
        self.versions = versions
        self._refused: set[tuple[str, str]] = set()  # (peer, reason) logged once
        self._refused_now: dict[str, str] = {}  # peer -> why its last connect was refused
        self.clients: dict[str, PeerClient] = {}
        self.avoided: dict[str, float] = {}  # peer -> monotonic time it may be asked again
        self._closing: set[asyncio.Task] = set()
        self._connecting: dict[str, asyncio.Lock] = {}

    def open(self, agent: Agent, fingerprint: int) -> None:
        """The node serves: its agent reads from peers, of this layout."""
        self.agent, self.fingerprint = agent, fingerprint

    def avoiding(self, peer: str, now: float) -> bool:
        return self.avoided.get(peer, 0.0) > now

    def avoided_now(self) -> list[str]:
        now = time.monotonic()
        return sorted(p for p, until in self.avoided.items() if until > now)

    async def pull(
        self, peer: str, keys: list[bytes], sink: BlockSink, timeout: float, staged: bool = False
    ) -> list[bytes]:
        """The prefix of `keys` now held here after pulling from `peer` (see
        transport's `pull`): verified, or empty when the peer cannot be reached.
        `staged`: the peer holds the first of them on disk."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        for again in (False, True):
            client = await self.client(peer, deadline - time.monotonic())
            if client is None:
                self._avoid(peer, self._refused_now.pop(peer, "unreachable"))
                return []
            heard = client.heard
            got = await pull(client, keys, sink, max(0.0, deadline - time.monotonic()), staged)
            # A peer at its cap closes the connection idle longest for a new
            # peer (transport/peer_rpc/server.py). One that hung up without a word
            # to this pull may have closed ours as the pin went out: pull
            # again on a new connection rather than leave the peer alone.
            # (A peer that died refuses the new one, and is left alone then.)
            if got or again or not client.hung_up or client.heard != heard:
                break
            if deadline - time.monotonic() < 0.1 * timeout:
                break
            log.info("pulling again on a new connection peer=%s", peer)
        if len(got) < len(keys):
            # fewer blocks than the index said: evicted there meanwhile (fine),
            # or a peer that is gone or too slow (leave it alone for a while,
            # on a new connection: a request stuck in this one's socket would
            # hold up every later one until TCP retransmits it)
            if not client.usable:
                self._avoid(peer, "connection lost")
            elif time.monotonic() - t0 >= 0.9 * timeout:
                self._avoid(peer, "timed out")
                self._forget(peer)
        return got

    def _avoid(self, peer: str, why: str) -> None:
        log.warning("leaving a peer alone peer=%s reason=%s seconds=%d", peer, why, self.backoff_s)
        self.avoided[peer] = time.monotonic() + self.backoff_s

    def _forget(self, peer: str) -> None:
        """Drop a peer's client; it closes in the background (closing waits a
        little for its unpins, which a partitioned peer never answers)."""
        client = self.clients.pop(peer, None)
        if client is not None:
            task = asyncio.create_task(client.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def client(self, peer: str, timeout: float) -> PeerClient | None:
        """A connected client for a peer the index knows, or None (also when
        connecting takes longer than `timeout`: a frozen peer still accepts).
        One connect per peer at a time: a pull, a lookup and a flush that
        all find no client share the one that connects."""
        client = self.clients.get(peer)
        if client is not None and client.usable:
            return client  # every call but a connect's: no lock, no task
        lock = self._connecting.setdefault(peer, asyncio.Lock())
        try:
            await asyncio.wait_for(lock.acquire(), timeout)
        except TimeoutError:
            return None
        try:
            return await self._connect(peer, timeout)
        finally:
            lock.release()

    async def _connect(self, peer: str, timeout: float) -> PeerClient | None:
        client = self.clients.get(peer)
        if client is not None and client.usable:
            return client
        self._forget(peer)
        record = self.record(peer)
        if self.agent is None or record is None or self.fingerprint not in record.fingerprints:
            return None  # no agent: a node with no fleet, which has no peers
        refused = self.versions.refusal(record.protocol, f"peer {peer}", f"node {self.node_id}")
        if refused is not None:  # its record says so: no connection to find it out
            self._refuse(peer, refused)
            return None
        client = PeerClient(
            self.agent, self.secret, [self.fingerprint], self.node_id, self.calls, self.versions
        )
        try:
            address, port = record.address, record.rpc_port
            await client.connect(address, port, timeout, self.local_host, expect=peer)
        except VersionError as e:
            self._refuse(peer, str(e))
            await client.close()
            return None
        except (OSError, TimeoutError, TransportError) as e:
            log.info("peer unreachable peer=%s error=%r", peer, e)
            await client.close()
            return None
        self.clients[peer] = client
        return client

    def _refuse(self, peer: str, why: str) -> None:
        """A peer of a protocol version this node does not talk to: logged
        once per peer and reason (it is asked again after each backoff)."""
        self._refused_now[peer] = "another protocol version"
        if (peer, why) not in self._refused and len(self._refused) < 1024:
            self._refused.add((peer, why))
            log.warning("not pulling from a peer of another version peer=%s reason=%s", peer, why)

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()
        self.clients.clear()
        if self._closing:
            await asyncio.wait(list(self._closing))
