"""The vLLM connector: `KVConnectorBase_V1` over a kvbm node.

    --kv-transfer-config '{"kv_connector": "KvbmConnector",
        "kv_connector_module_path": "kvbm.connector.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"node": "/run/kvbm/node.sock",
                                      "remote_tiers": ["host", "disk"]}}'

vLLM makes one instance per role and process; this facade hands each hook
to its role's side: `scheduler.py` (engine-core process: lookups,
promises, pins, holds after a failed load, each step's saves), `worker.py`
(each worker: copies between vLLM's KV cache and the node's arena), with
`metadata.py` what crosses between them each step. A node that is gone
makes every request a miss until it is back, never an engine error.
Which model shapes it stores: docs/models.md, "Model shapes". The
last generated token has no KV (it was never an input), so a block that
ends with it is not stored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)

from kvbm.config import engine_config
from kvbm.connector.vllm.engine_setup import engine_setup, geometry_of, kv_transfer_config
from kvbm.connector.vllm.metadata import KvbmMetadata, Load, Save
from kvbm.connector.vllm.refusal import announce_off
from kvbm.connector.vllm.scheduler import KvbmScheduler
from kvbm.connector.vllm.stats import KvbmPromMetrics, KvbmStats
from kvbm.connector.vllm.worker import KvbmWorker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["KvbmConnector", "KvbmMetadata", "Load", "Save", "geometry_of", "kv_transfer_config"]


class KvbmConnector(KVConnectorBase_V1, SupportsHMA):
    """Hands each hook to the role's side: `scheduler` in the scheduler
    role, `worker` in the worker role, the other one None.

    It declares `SupportsHMA`, so vLLM keeps its hybrid KV cache manager
    with kvbm configured: without it vLLM turns the manager off, and a
    Mamba or linear-attention hybrid then fails to start. Groups of
    attention (gpt-oss's full and sliding-window layers) are stored, a slot
    holding every group's layers of a position; a group kvbm does not store
    (Mamba state) turns the connector off (logged, and shown in `kvbm
    status`) and the engine runs without it."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.setup = engine_setup(vllm_config, self._kv_transfer_config, kv_cache_config)
        is_worker = role == KVConnectorRole.WORKER
        announce_off(self.setup, vllm_config.model_config, speaks_for_engine=not is_worker)
        self.scheduler = None if is_worker else KvbmScheduler(self.setup)
        self.worker = KvbmWorker(self.setup) if is_worker else None

    def _sched(self) -> KvbmScheduler:
        assert self.scheduler is not None, "a scheduler hook called in the worker role"
        return self.scheduler

    def _work(self) -> KvbmWorker:
        assert self.worker is not None, "a worker hook called in the scheduler role"
        return self.worker

    def _meta(self) -> KvbmMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvbmMetadata)
        return meta

    # -- scheduler role (kvbm/connector/vllm/scheduler.py) -----------------
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self._sched().get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        self._sched().update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._sched().build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._sched().update_connector_output(connector_output)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self._sched().request_finished(request), None

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        """vLLM's hook with the hybrid manager on: every group's blocks. The
        scheduler side tracks every group's blocks itself, so the same answer."""
        return self._sched().request_finished(request), None

    def get_kv_connector_stats(self) -> KvbmStats | None:
        return self.scheduler.take_stats() if self.scheduler is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KvbmStats:
        return KvbmStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls, vllm_config: VllmConfig, metric_types: dict, labelnames: list[str], per_engine: dict
    ) -> KvbmPromMetrics:
        return KvbmPromMetrics(vllm_config, metric_types, labelnames, per_engine)

    # -- worker role (kvbm/connector/vllm/worker.py) -----------------------
    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """Async loads are waited for per layer in Python between graph
        pieces; a whole-model CUDA graph would replay past the waits."""
        return engine_config(dict(extra_config or {})).engine_copies != "sync"

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.distributed.parallel_state import (
            get_pp_group,
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        # vLLM's numbering of its workers (block_key.py): stage, then TP rank
        stage = get_pp_group().rank_in_group
        rank = stage * get_tensor_model_parallel_world_size() + get_tensor_model_parallel_rank()
        self._work().register_kv_caches(kv_caches, rank)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if isinstance(kv_connector_metadata, KvbmMetadata):
            self._work().handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self._work().start_load_kv(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._work().wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, *args: Any, **kw: Any) -> None:
        return  # blocks are saved whole, all layers at once, after the forward

    def wait_for_save(self) -> None:
        self._work().wait_for_save(self._meta())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, None]:
        return self._work().get_finished(finished_req_ids), None

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """Saves ended (as `get_finished`), and waiting loads received or
        failed (a windowed group's hits, metadata.Load.waiting)."""
        worker = self._work()
        sending = worker.get_finished(finished_req_ids)
        received, failed = worker.take_received()
        return KVConnectorTransferResults(set(sending or ()), received, failed)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._work().get_block_ids_with_load_errors()

    def shutdown(self) -> None:
        (self.worker or self._sched()).shutdown()
        private = self.setup.private_node
        if private is not None and private.poll() is None:
            private.terminate()
