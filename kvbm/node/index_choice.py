"""Which index a node joins, read once from its configuration: in memory (no
etcd: one node), etcd with the mirror layout, or etcd with the sharded
layout (`index_layout`), whose locations travel over the node's peer calls
(kvbm/node/index_calls.py). Every part gets what it needs here, when it is
built; nothing is set on it later."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from discovery.etcd_index import mirror_index, sharded_index
from discovery.index import BlockIndex
from discovery.memory import MemoryIndex
from discovery.records import NodeRecord
from discovery.sharded import ShardedLocations
from discovery.signing import IndexSigner
from kvbm.config import KvbmConfig
from kvbm.node.index_calls import OwnerClient, owner_calls
from transport.peer_rpc import PeerCall

# At most one etcd write per changed run this often: a run's tier changes and
# evictions come in bursts (measured on `kvbm bench index --nodes 32`'s trace:
# 84 etcd writes per 1,000 blocks at 5 ms, 67 at 50 ms, 16-18 at 500 ms).
INDEX_FLUSH_S = 0.5


@dataclass(frozen=True)
class IndexChoice:
    """The index of a node, as its parts need it. `open` makes a new index of
    the node's record (one per attempt to join); `owner` is the node's share
    of a sharded index (None in the other layouts), whose calls
    (`peer_calls`) the node's peer server serves."""

    open: Callable[[NodeRecord], BlockIndex]
    places_by_anchor: bool = False  # publish each key's group anchor with it
    owner: ShardedLocations | None = None
    peer_calls: dict[str, PeerCall] = field(default_factory=dict)

    def serving(self) -> None:
        """The node serves now: connect ahead to the owners already known
        (before, it could reach nobody)."""
        if self.owner is not None:
            self.owner.warm_ring()


def choose_index(cfg: KvbmConfig, signer: IndexSigner, owners: OwnerClient) -> IndexChoice:
    """`signer`: what the node writes is signed, and only signed values are
    believed. `owners`: the node's calls to the owners of a sharded index."""
    if not cfg.etcd_endpoints:
        return IndexChoice(lambda record: MemoryIndex(cfg.namespace, record))
    etcd = {"lease_ttl": cfg.lease_ttl, "signer": signer, "tls": cfg.etcd_tls}
    if cfg.index_layout != "sharded":
        publish_after = cfg.index_publish_after_ms / 1000

        def open_mirror(record: NodeRecord) -> BlockIndex:
            return mirror_index(
                cfg.etcd_endpoints,
                cfg.namespace,
                record,
                flush_interval=INDEX_FLUSH_S,
                publish_after=publish_after,
                **etcd,
            )

        return IndexChoice(open_mirror)
    owner = ShardedLocations(cfg.node_name, owners.place, owners.locate, owners.warm)

    def open_sharded(record: NodeRecord) -> BlockIndex:
        return sharded_index(
            cfg.etcd_endpoints,
            cfg.namespace,
            record,
            owner,
            flush_interval=INDEX_FLUSH_S,
            **etcd,
        )

    return IndexChoice(open_sharded, True, owner, owner_calls(owner))
