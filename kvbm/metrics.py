"""Prometheus metrics of one block manager, in a registry of its own (so tests
and several managers in one process never collide); the daemon exposes it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


class TierMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.blocks = Gauge(
            "kvbm_tier_blocks", "Blocks registered in the tier", ["tier"], registry=r
        )
        self.bytes = Gauge(
            "kvbm_tier_bytes", "Block bytes registered in the tier", ["tier"], registry=r
        )
        self.capacity = Gauge(
            "kvbm_tier_capacity_blocks", "Slots in the tier", ["tier"], registry=r
        )
        self.hits = Counter(
            "kvbm_tier_hits_total", "Blocks found in the tier", ["tier"], registry=r
        )
        self.misses = Counter(
            "kvbm_tier_misses_total",
            "Blocks looked up and not found in the tier",
            ["tier"],
            registry=r,
        )
        self.evictions = Counter(
            "kvbm_tier_evictions_total", "Blocks evicted from the tier", ["tier"], registry=r
        )
        self.rejected = Counter(
            "kvbm_tier_admissions_rejected_total",
            "Blocks not admitted to the tier (reason: frequency, full, io_error, no_space)",
            ["tier", "reason"],
            registry=r,
        )
        self.checksum_failures = Counter(
            "kvbm_tier_checksum_failures_total",
            "Blocks whose bytes did not match their checksum (served as misses)",
            ["tier"],
            registry=r,
        )
        self.io_errors = Counter(
            "kvbm_tier_io_errors_total",
            "Blocks whose read failed (served as misses; the block is kept)",
            ["tier"],
            registry=r,
        )
        self.engine_blocks = Counter(
            "kvbm_engine_blocks_total",
            "Blocks handed to engines, by source: local_host, local_disk, remote_host, remote_disk",
            ["source"],
            registry=r,
        )
        self.moved = Counter(
            "kvbm_transfer_bytes_total", "Block bytes moved between tiers", ["path"], registry=r
        )
        self.pulls = Histogram(
            "kvbm_peer_pull_seconds",
            "Pulls of a run of blocks from a peer: its pin to its last block verified here",
            ["tier"],  # where the peer held the run's first block
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )

    def watch_tier(
        self, tier: str, blocks: Callable[[], int], block_bytes: int, slots: int
    ) -> None:
        """Gauges read the tier's table when scraped, so they never drift from it."""
        self.blocks.labels(tier).set_function(blocks)
        self.bytes.labels(tier).set_function(lambda: blocks() * block_bytes)
        self.capacity.labels(tier).set(slots)

    def watch_index(self, rejected: Callable[[], int], over_cap: Callable[[], int]) -> None:
        """`kvbm_index_rejected_total`, read from the index mirror when scraped."""
        self.registry.register(_IndexRejected(rejected, over_cap))

    def watch_peers(self, figures: Callable[[], PeerFigures]) -> None:
        """The fleet's gauges (`kvbm_index_nodes`, `kvbm_peers_avoided`,
        `kvbm_peer_connections`...), read from the node's parts when scraped."""
        self.registry.register(_Peers(figures))

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (tests, status, the demo's summary)."""
        v = self.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _IndexRejected:
    """Index values the mirror dropped: not signed by the fleet (an etcd writer
    without the secret), or new locations past the mirror's cap."""

    def __init__(self, rejected: Callable[[], int], over_cap: Callable[[], int]) -> None:
        self.rejected, self.over_cap = rejected, over_cap

    def collect(self) -> Iterator[CounterMetricFamily]:
        c = CounterMetricFamily(
            "kvbm_index_rejected",
            "Index values dropped (reason: signature, cap)",
            labels=["reason"],
        )
        c.add_metric(["signature"], self.rejected())
        c.add_metric(["cap"], self.over_cap())
        yield c


@dataclass(frozen=True)
class PeerFigures:
    """A node's view of its fleet at one moment (what `kvbm status` shows too)."""

    index_nodes: int  # nodes of its namespace in the index, itself included
    avoided: int  # peers left alone for peer_backoff_s after a timeout or a lost connection
    connections: int  # authenticated connections from peers, open now
    closed_idle: int  # connections closed to make room for another peer, since the start


class _Peers:
    """A rolling upgrade shows here first: `kvbm_index_nodes` dips by one
    while a node restarts, and the others' `kvbm_peer_connections` drop and
    come back as its peers reconnect."""

    def __init__(self, figures: Callable[[], PeerFigures]) -> None:
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        f = self.figures()
        yield GaugeMetricFamily(
            "kvbm_index_nodes",
            "Nodes of this node's namespace in the index, this one included",
            value=f.index_nodes,
        )
        yield GaugeMetricFamily(
            "kvbm_peers_avoided",
            "Peers left alone for peer_backoff_s after a timeout or a lost connection",
            value=f.avoided,
        )
        yield GaugeMetricFamily(
            "kvbm_peer_connections",
            "Authenticated connections from peers, open now",
            value=f.connections,
        )
        yield CounterMetricFamily(
            "kvbm_peer_connections_closed_idle",
            "Idle peer connections closed to make room for another peer (max_peer_connections)",
            value=f.closed_idle,
        )


class BuildInfo:
    """`kvbm_build_info{version}` 1: which release each node runs, so that a
    rolling upgrade's progress is one query (count by version). The node
    serves it from its first moment, before any engine attaches."""

    def __init__(self, version: str) -> None:
        self.version = version

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily(
            "kvbm_build_info", "The kvbm release this node runs", labels=["version"]
        )
        g.add_metric([self.version], 1)
        yield g


class EngineRefusals:
    """`kvbm_engine_refusals_total`: engines whose connector turned itself
    off, by kind (kvbm/engine_wire.py REFUSAL_KINDS, a fixed set, never the
    free text of a reason), read from the node's refusals when scraped. A
    refused engine never attaches, so the node registers this in the
    registry it serves before any engine has, and again in the tiers'."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        c = CounterMetricFamily(
            "kvbm_engine_refusals",
            "Engines whose kvbm connector turned itself off (kind: kv_cache, model_identity)",
            labels=["kind"],
        )
        for kind, n in sorted(self.counts().items()):
            c.add_metric([kind], n)
        yield c
