"""What the vLLM connector counts, through vLLM's own connector stats: the
scheduler side hands its counts to vLLM each step (`KvbmStats`), vLLM sums
them per logging interval, logs them, and records them in its Prometheus
registry (`KvbmPromMetrics`), so they are on vLLM's /metrics beside its own.

Counted now: requests the connector neither looks up nor saves because an
input shapes their KV that the block hash cannot name (a multimodal input
without an identifier, say; kvbm/connector/identity.py), and why.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

NOT_CACHED = "requests_not_cached"


class KvbmStats(KVConnectorStats):
    """Counts since vLLM last took them: {name: count}."""

    def reset(self) -> None:
        self.data = {}

    def count(self, name: str, n: int = 1) -> None:
        self.data[name] = self.data.get(name, 0) + n

    def aggregate(self, other: KVConnectorStats) -> KvbmStats:
        for name, n in other.data.items():
            self.count(name, n)
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


class KvbmPromMetrics(KVConnectorPromMetrics):
    """`vllm:kvbm_requests_not_cached` (a counter per engine)."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict,
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        counter = self._counter_cls(
            name="vllm:kvbm_requests_not_cached",
            documentation="Requests kvbm neither looked up nor saved: an input shapes "
            "their KV that the block hash cannot name",
            labelnames=labelnames,
        )
        self.not_cached: dict[int, Counter] = {
            idx: counter.labels(*values) for idx, values in per_engine_labelvalues.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        n = transfer_stats_data.get(NOT_CACHED, 0)
        if n and engine_idx in self.not_cached:
            self.not_cached[engine_idx].inc(n)
