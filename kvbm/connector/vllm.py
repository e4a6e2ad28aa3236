"""The vLLM connector: `KVConnectorBase_V1` over a kvbm node.

    --kv-transfer-config '{"kv_connector": "KvbmConnector",
        "kv_connector_module_path": "kvbm.connector.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"node": "/run/kvbm/node.sock",
                                      "remote_tiers": ["host", "disk"]}}'

Scheduler side (engine-core process): for a new request, hash its prompt's
full blocks (`kvbm.hashing`) and read the node's key view (kvbm/key_view.py,
shared memory, no round trip) for the longest prefix it could serve beyond
vLLM's own prefix-cache hit: a miss costs the scheduler that read alone.
With `kv_load_failure_policy` "recompute" a hit is promised as the view
shows it, and the step's hits are pinned in one `load_many` when the step's
metadata is built (the node stages its disk and pulls from peers then); a
block gone meanwhile is reported failed by the workers and vLLM recomputes
from it. With "fail" such a block would fail its request, so a hit is
pinned before it is promised. The metadata of the step carries (arena
slots -> vLLM block ids) per load, and the full blocks each request
completes in that step: prompt and generated tokens alike, so a chat's next
turn (this turn's prompt and answer, then a new message) finds the answer's
blocks too. Their sequence hashes continue over the generated tokens as
they are generated, exactly as the next turn's prompt hashes them.

A block that did not load (the scheduler's pins came short, or a worker's
copy failed) is recomputed by vLLM, and until vLLM has rolled a request back
to it, nothing computed over it is saved: not by that request, nor by one
sharing the block through vLLM's prefix cache, nor in the steps vLLM
scheduled before it saw the failure (the scheduler holds the request's saves
until its computed tokens come back to the block, then tells the workers).
Not yet: where one tensor-parallel rank's copy failed, the other ranks'
saves of that step (their KV depends on it through the all-reduce).

Worker side (kvbm/connector/transfers.py): a load starts in `start_load_kv`
and the forward waits for each layer in `wait_for_layer_load`; the pins are
released after the forward. After the forward (`wait_for_save`) the
completed blocks are reserved in the node and copied into its arena;
`engine_copies` says whether they are committed at once (sync) or in a
later step's `get_finished`, the request's blocks kept from vLLM until then
(async; `handle_preemptions` waits until saves in flight have read the
blocks of preempted requests). Whole blocks, one torch op per run of blocks
for every layer (kvbm/connector/copy.py, any of vLLM's KV cache layouts; a
GPU's through a staging buffer, kvbm/connector/cuda.py). A load that fails
is reported through `get_block_ids_with_load_errors`, so vLLM recomputes
(with `kv_load_failure_policy` "recompute"); a node that is gone makes every
request a miss until it is back, never an engine error.

Not yet: more than one KV cache group (sliding-window or hybrid models),
quantized KV caches, pipeline or context parallelism. The last generated
token has no KV (it was never an input), so a block that ends with it is
not stored.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvbm.block_key import Groups
from kvbm.config import engine_config
from kvbm.connector.attach import NodeAttachment, NodeError
from kvbm.connector.copy import EngineKV
from kvbm.connector.identity import Unnameable, model_identity, prompt_hashes
from kvbm.connector.private_node import ensure_private_node
from kvbm.connector.transfers import Copier, SyncCopier, ThreadCopier, Ticket
from kvbm.connector.vllm_stats import NOT_CACHED, KvbmPromMetrics, KvbmStats
from kvbm.engine_wire import MAX_KEYS
from kvbm.errors import KvbmError
from kvbm.hashing import BlockHasher
from kvbm.layout import VLLM_CPU_LAYOUT, ModelGeometry
from kvbm.logs import attach_logging

if TYPE_CHECKING:
    from vllm.config import KVTransferConfig, VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvbm.connector.vllm")
RETRY_S = 2.0  # after a node failure, try to reattach this often


@dataclass
class Load:
    """Arena slots the node pinned (per tensor-parallel rank) -> vLLM block ids."""

    leases: list[int]
    slots: list[list[int]]
    block_ids: list[int]
    req_id: str = ""


@dataclass
class Save:
    """Full blocks a request completes in this step: their sequence hashes,
    vLLM block ids and groups (kvbm/block_key.py)."""

    seq_hashes: list[int]
    block_ids: list[int]
    req_id: str = ""
    groups: Groups | None = None


@dataclass
class KvbmMetadata(KVConnectorMetadata):
    arena: str = ""  # the node's arena the slots refer to (a restarted node has another)
    loads: list[Load] = field(default_factory=list)
    saves: list[Save] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)  # promised blocks the node did not pin
    preempted: bool = False  # vLLM may reuse blocks that saves in flight still read
    released: list[str] = field(default_factory=list)  # requests that may save again


@dataclass
class _Promise:
    """Blocks `get_num_new_matched_tokens` promised from the key view, with
    the vLLM blocks allocated for them: pinned in one batch per step."""

    tracked: _Tracked
    first: int
    block_ids: list[int]


@dataclass
class _Tracked:
    """What the scheduler side keeps per request."""

    request: Request
    seed: int | None  # the hash before its first block; None: not cached (see _track)
    seq_hashes: list[int]  # of its full blocks so far (prompt, then generated tokens)
    extras: dict[int, bytes] = field(default_factory=dict)  # by block (kvbm/connector/identity.py)
    block_ids: list[int] = field(default_factory=list)
    saved: int = 0  # leading blocks known to be in the node
    had_saves: bool = False  # a save was planned: with async copies, freeing waits for it
    hold_from: int | None = None  # a block that never loaded: no saves until recomputed from it
    pinned: Load | None = None  # pinned by get_num_new_matched_tokens, not yet sent
    promised: int = 0  # blocks promised from the key view, not yet allocated
    first_block: int = 0


def kv_transfer_config(extra: dict[str, Any], policy: str = "recompute") -> KVTransferConfig:
    """vLLM's `kv_transfer_config` for this connector (what the README's JSON says)."""
    from vllm.config import KVTransferConfig

    return KVTransferConfig(
        kv_connector="KvbmConnector",
        kv_connector_module_path=__name__,
        kv_role="kv_both",
        kv_load_failure_policy=policy,
        kv_connector_extra_config=extra,
    )


def geometry_of(
    vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None = None
) -> ModelGeometry:
    """The geometry of vLLM's KV cache, from its one cache group's spec (the
    model's config where there is none) and the layout the engine core
    resolved before it made the scheduler and the workers."""
    mc, pc, cc = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    if cc.cache_dtype not in ("auto", None):
        raise KvbmError(f"kvbm does not store a {cc.cache_dtype} KV cache yet")
    # Keys carry the tensor-parallel rank only: a pipeline stage's or a
    # context-parallel rank's share of a block would collide.
    for name in ("pipeline_parallel_size", "decode_context_parallel_size"):
        if getattr(pc, name, 1) > 1:
            raise KvbmError(f"kvbm does not store KV caches split by {name} > 1 yet")
    layout = (
        getattr(kv_cache_config, "kv_cache_layout", None) or cc.kv_cache_layout or VLLM_CPU_LAYOUT
    )
    groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
    if not groups:
        return ModelGeometry(
            num_layers=mc.get_num_layers(pc),
            num_kv_heads=mc.get_num_kv_heads(pc),
            head_dim=mc.get_head_size(),
            block_size=cc.block_size,
            dtype=str(mc.dtype).removeprefix("torch."),
            kv_layout=layout,
        )
    spec = groups[0].kv_cache_spec
    kind = type(spec).__name__
    if len(groups) != 1 or kind not in ("FullAttentionSpec", "MLAAttentionSpec"):
        kinds = sorted({type(g.kv_cache_spec).__name__ for g in groups})
        raise KvbmError(f"kvbm stores one KV cache group of full attention; this model has {kinds}")
    if spec.state_content_bytes is not None:
        raise KvbmError("kvbm does not store packed (quantized) KV pages yet")
    return ModelGeometry(
        num_layers=len(groups[0].layer_names),
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_size,
        head_dim_v=spec.head_size_v,
        block_size=spec.block_size,
        dtype=str(spec.dtype).removeprefix("torch."),
        kv_layout=layout,
    )


class KvbmConnector(KVConnectorBase_V1):
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.cfg = engine_config(extra)
        attach_logging(self.cfg.log_level)
        self.block_size = vllm_config.cache_config.block_size
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        self._private = None
        self._hasher: BlockHasher | None = None  # from the node, at the first attach
        self.stats = KvbmStats()  # counts vLLM takes each step (kvbm/connector/vllm_stats.py)
        self.socket = self.cfg.socket
        # Whatever goes wrong here turns the connector off, never the engine.
        self._off: str | None = None
        try:
            self.geometry = geometry_of(vllm_config, kv_cache_config)
            self.model_identity = model_identity(vllm_config.model_config)
            if "node" not in extra:
                self.socket, self._private = ensure_private_node(self.cfg)
        except (KvbmError, ValueError, OSError) as e:
            self._off = str(e)
            log.error("kvbm connector off, the engine runs without it: %s", e)
        if self._kv_transfer_config.kv_load_failure_policy != "recompute":
            log.warning(
                'kv_load_failure_policy is not "recompute": a failed load fails its request'
            )
        self._node: list[NodeAttachment] | None = None
        self._retry_at = 0.0
        # scheduler side
        self._requests: dict[str, _Tracked] = {}
        self._to_load: list[Load] = []
        self._promises: list[_Promise] = []
        # With "recompute", a hit the key view shows is promised at once and
        # pinned with the step's others; a block gone meanwhile is recomputed.
        # With "fail" it would fail its request: hits are pinned before promising.
        self._promise = self._kv_transfer_config.kv_load_failure_policy == "recompute"
        # Copies started in one hook and finished in a later one (both sides
        # must agree: the scheduler then keeps a saved request's blocks until
        # the workers report its saves done).
        device = vllm_config.device_config.device_type
        self._async = self.cfg.engine_copies == "async" or (
            self.cfg.engine_copies == "auto" and device != "cpu"
        )
        # worker side
        self._rank = 0
        self._kv: EngineKV | None = None
        self._layer_of: dict[str, int] = {}
        self._copier: Copier | None = None
        self._copier_arena = ""
        self._loading: list[tuple[Load, Ticket, str]] = []  # with the arena pinned in
        self._saving: list[_Saving] = []
        self._in_flight: dict[str, int] = {}  # saves started and not committed, per request
        self._had_saves: set[str] = set()  # requests the scheduler planned saves for
        self._finishing: set[str] = set()  # finished, waiting for their saves
        self._load_errors: set[int] = set()
        # Requests computed over blocks that did not load here: no saves
        # until the scheduler has seen vLLM recompute them (meta.released).
        self._tainted: set[str] = set()
        self._step_bad: set[int] = set()  # blocks of this step that did not load

    # -- the node, attached lazily and reattached after failures -----------
    def _attached(self) -> list[NodeAttachment] | None:
        """One attachment per rank this side speaks for (the scheduler: every
        rank's keys; a worker: its own, with the arena mapped)."""
        if self._node is not None:
            return self._node
        if self._off or time.monotonic() < self._retry_at:
            return None
        worker = self.role == KVConnectorRole.WORKER
        made: list[NodeAttachment] = []
        try:
            for rank in [self._rank] if worker else range(self.tp_size):
                made.append(
                    NodeAttachment(
                        self.socket,
                        self.geometry,
                        rank,
                        self.cfg.remote_tier_list,
                        map_arena=worker,
                        key_id=self._hasher.key.key_id if self._hasher else None,
                        node_uid=self.cfg.node_uid,
                    )
                )
        except (NodeError, KvbmError, OSError) as e:
            for a in made:
                a.close()
            self._lost(e)
            return None
        self._node = made
        self._hasher = self._hasher or made[0].hasher
        return made

    def _reattach(self) -> None:
        self._drain()  # copies in flight use the arena mapping the close unmaps
        for a in self._node or []:
            a.close()
        self._node, self._retry_at = None, 0.0

    def _lost(self, error: BaseException) -> None:
        log.warning("kvbm node unavailable, serving without it: %s", error)
        self._reattach()
        self._retry_at = time.monotonic() + RETRY_S

    # -- scheduler side ----------------------------------------------------
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        tracked = self._track(request)
        self._drop_pins(tracked)
        tracked.promised = 0
        if tracked.seed is None:
            return 0, False  # not cached (`_hash_prompt`)
        # the last prompt token is always computed: vLLM needs its logits
        usable = (request.num_prompt_tokens - 1) // self.block_size
        first = num_computed_tokens // self.block_size
        usable = min(usable, first + MAX_KEYS)  # what one call may ask
        if usable <= first:
            return 0, False
        node = self._attached()
        if node is None:
            return 0, False
        t0 = time.perf_counter()
        keys = [a.keys(tracked.seq_hashes[first:usable]) for a in node]
        groups = Groups.of(tracked.seq_hashes, first, usable)
        seen = [a.seen(k) for a, k in zip(node, keys, strict=True)]
        if all(s is not None for s in seen):
            n = min(s.total for s in seen)  # type: ignore[union-attr]
            if n == 0:
                return 0, False  # a miss, told by the view: the node is not asked
            if self._promise:
                tracked.promised = min(n, node[0].step_blocks)
                tracked.first_block = first
                return tracked.promised * self.block_size, False
        pinned: list = []
        try:
            for a, k in zip(node, keys, strict=True):
                pinned.append(a.prepare_load(k, groups))
                if not pinned[-1].slots:
                    break
        except NodeError as e:
            self._release(Load([p.lease for p in pinned], [], []))
            self._lost(e)
            return 0, False
        n = min(len(p.slots) for p in pinned) if len(pinned) == len(node) else 0
        load = Load([p.lease for p in pinned], [p.slots[:n] for p in pinned], [])
        if n == 0:
            self._release(load)
            return 0, False
        tracked.pinned, tracked.first_block = load, first
        log.debug("pinned blocks=%d ms=%.2f", n, (time.perf_counter() - t0) * 1e3)
        return n * self.block_size, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        tracked = self._track(request)
        n = num_external_tokens // self.block_size
        first = tracked.first_block
        if tracked.promised:
            n, tracked.promised = min(n, tracked.promised), 0
            if n:
                ids = list(blocks.get_block_ids()[0][first : first + n])
                self._promises.append(_Promise(tracked, first, ids))
                tracked.saved = max(tracked.saved, first + n)  # in the node (or recomputed)
            return
        load = tracked.pinned
        if load is None:
            return
        tracked.pinned = None
        if n == 0:
            self._release(load)
            return
        ids = blocks.get_block_ids()[0]
        load.block_ids = list(ids[first : first + n])
        load.slots = [s[:n] for s in load.slots]
        load.req_id = request.request_id
        self._to_load.append(load)
        tracked.saved = max(tracked.saved, first + n)  # these are in the node already

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        node = self._node
        meta = KvbmMetadata(arena=node[0].arena_name if node else "", loads=self._to_load)
        self._to_load = []
        if self._off:
            return meta
        meta.preempted = bool(getattr(scheduler_output, "preempted_req_ids", None))
        self._pin_promises(meta)
        bad = set(meta.failed)
        steps = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._requests.get(new.req_id)
            if tracked is not None:
                tracked.block_ids = list(new.block_ids[0])
                self._plan_save(meta, tracked, new.num_computed_tokens, steps[new.req_id], bad)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._requests.get(req_id)
            if tracked is None:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                if req_id in cached.resumed_req_ids:
                    tracked.block_ids = list(new_ids[0])
                else:
                    tracked.block_ids += new_ids[0]
            computed = cached.num_computed_tokens[i]
            self._plan_save(meta, tracked, computed, steps[req_id], bad)
        return meta

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Blocks the workers could not load (vLLM has rolled their requests
        back by now): every request holding one saves nothing more until
        vLLM has recomputed from it."""
        bad = connector_output.invalid_block_ids
        if bad:
            for tracked in self._requests.values():
                _hold(tracked, bad)

    def _pin_promises(self, meta: KvbmMetadata) -> None:
        """Pin this step's promised blocks, one round trip per rank. A block
        the node no longer has goes to `meta.failed`: the workers report it
        failed, vLLM recomputes from it, and no request holding it saves
        until then (`_plan_save`)."""
        promises, self._promises = self._promises, []
        if not promises:
            return
        node = self._node
        pins: list[list] = []
        try:
            if node is None:
                raise NodeError("the node is gone")
            for a in node:
                asked = [a.keys(_hashes(p)) for p in promises]
                pins.append(a.prepare_loads(asked, [_groups(p) for p in promises]))
        except NodeError as e:
            for rank in pins:
                self._release(Load([p.lease for p in rank], [], []))
            if node is not None:
                self._lost(e)
            pins = []
        short = 0
        for i, p in enumerate(promises):
            got = [rank[i] for rank in pins]
            m = min((len(g.slots) for g in got), default=0)
            req_id = p.tracked.request.request_id
            load = Load([g.lease for g in got], [g.slots[:m] for g in got], p.block_ids[:m], req_id)
            if m:
                meta.loads.append(load)
            else:
                self._release(load)
            if m < len(p.block_ids):
                meta.failed += p.block_ids[m:]
                short += 1
        if short:
            log.info("promised blocks gone before pinned, vLLM recomputes requests=%d", short)

    def _plan_save(
        self, meta: KvbmMetadata, tracked: _Tracked, before: int, scheduled: int, bad: set[int]
    ) -> None:
        """Save the full blocks whose KV exists once this step has run
        (`before` tokens computed, then `scheduled` more: prompt, then
        generated ones). A request holding a block that never loaded (`bad`,
        or reported since) saves nothing until vLLM has rolled it back to
        that block; the workers are told when it may save again."""
        req_id = tracked.request.request_id
        if bad:
            _hold(tracked, bad)
        if tracked.hold_from is not None:
            if before > tracked.hold_from * self.block_size:
                return  # computed over blocks that never arrived (and not yet redone)
            tracked.hold_from = None
            meta.released.append(req_id)
        computed = before + scheduled
        tokens = tracked.request.all_token_ids
        full = min(min(computed, len(tokens)) // self.block_size, len(tracked.block_ids))
        hashed = len(tracked.seq_hashes)
        if tracked.seed is None or self._hasher is None:
            return  # not cached: its blocks have no keys
        if full > hashed:  # blocks of generated tokens: hash them on from the last one
            parent = tracked.seq_hashes[-1] if hashed else tracked.seed
            more = tokens[hashed * self.block_size : full * self.block_size]
            extras = {i - hashed: e for i, e in tracked.extras.items() if i >= hashed}
            tracked.seq_hashes += self._hasher.sequence_hashes(
                more, self.block_size, parent, extras
            )
        if full > tracked.saved:
            span = slice(tracked.saved, full)
            groups = Groups.of(tracked.seq_hashes, span.start, span.stop)
            save = Save(tracked.seq_hashes[span], tracked.block_ids[span], req_id, groups)
            meta.saves.append(save)
            tracked.saved = full
            tracked.had_saves = True

    # -- counts, into vLLM's stats and /metrics ---------------------------------
    def get_kv_connector_stats(self) -> KvbmStats | None:
        if self.stats.is_empty():
            return None
        taken, self.stats = self.stats, KvbmStats()
        return taken

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KvbmStats:
        return KvbmStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls, vllm_config: VllmConfig, metric_types: dict, labelnames: list[str], per_engine: dict
    ) -> KvbmPromMetrics:
        return KvbmPromMetrics(vllm_config, metric_types, labelnames, per_engine)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        tracked = self._requests.pop(request.request_id, None)
        if tracked is None:
            return False, None
        self._drop_pins(tracked)
        # Async copies: the blocks stay the request's until every worker has
        # reported its saves done (get_finished); sync ones end in their step.
        keep = self._async and tracked.had_saves
        if keep:
            log.debug("blocks kept for saves in flight: request %s", request.request_id)
        return keep, None

    def _track(self, request: Request) -> _Tracked:
        tracked = self._requests.get(request.request_id)
        if tracked is None:
            if self._hasher is None:
                self._attached()  # the node gives the hashing key
            tracked = self._requests[request.request_id] = self._hash_prompt(request)
        return tracked

    def _hash_prompt(self, request: Request) -> _Tracked:
        """A request's prompt blocks' hashes, or a request that is not cached:
        no hashing key yet (no node), or an input the hash cannot name."""
        if self._hasher is None:
            return _Tracked(request, None, [])
        try:
            hashed = prompt_hashes(self._hasher, self.model_identity, request, self.block_size)
        except Unnameable as e:
            self.stats.count(NOT_CACHED)
            log.info("request %s not cached: %s", request.request_id, e)
            return _Tracked(request, None, [])
        return _Tracked(request, hashed.seed, hashed.hashes, hashed.extras)

    def _drop_pins(self, tracked: _Tracked) -> None:
        if tracked.pinned is not None:
            self._release(tracked.pinned)
            tracked.pinned = None

    def _release(self, load: Load) -> None:
        node = self._node
        if node is None:
            return  # the node is gone, and its pins with it
        try:
            for lease in load.leases:
                node[0].complete_load(lease)
        except NodeError as e:
            self._lost(e)

    # -- worker side -------------------------------------------------------
    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """Async loads are waited for per layer in Python between graph
        pieces; a whole-model CUDA graph would replay past the waits."""
        return engine_config(dict(extra_config or {})).engine_copies != "sync"

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        self._rank = get_tensor_model_parallel_rank()
        if self._off:
            return
        try:
            layers = sorted(kv_caches.items(), key=lambda item: _layer_index(item[0]))
            kv = EngineKV(self.geometry, [t for _, t in layers])
            if kv.device.type not in ("cpu", "cuda"):
                raise KvbmError(f"kvbm copies CPU and CUDA caches, not {kv.device.type}")
            self._kv = kv
            self._layer_of = {name: i for i, (name, _) in enumerate(layers)}
        except KvbmError as e:
            log.error("kvbm disabled: vLLM's KV cache does not match the geometry: %s", e)
            self._kv = None
            return
        node = self._attached() if kv.device.type == "cuda" else None
        if node is not None:
            try:
                self._copies(node)  # pins the arena now, not in the first step
            except KvbmError as e:
                log.error("kvbm disabled: %s", e)

    def _copies(self, node: list[NodeAttachment]) -> Copier:
        """The copier for this attachment's arena (a restarted node has another)."""
        arena = node[0].arena_name
        if self._copier is None or self._copier_arena != arena:
            self._drain()
            kv, blocks = self._kv, node[0].blocks
            if kv is None or blocks is None:
                raise KvbmError("kvbm does not copy into this engine's KV cache")
            if kv.device.type == "cuda":
                from kvbm.connector.cuda import CudaCopier

                try:
                    self._copier = CudaCopier(blocks, kv)
                except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError included
                    self._kv = None  # the connector stops copying; the engine runs on
                    raise KvbmError(f"cannot copy through the GPU: {e}") from e
            elif self._async:
                self._copier = ThreadCopier(blocks, kv)
            else:
                self._copier = SyncCopier(blocks, kv)
            self._copier_arena = arena
            log.info("copies between vLLM's KV cache and the node: %s", type(self._copier).__name__)
        return self._copier

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """Before the step's forward: preempted requests' blocks go back to
        vLLM at once, so saves still reading them must have read them."""
        meta = kv_connector_metadata
        if isinstance(meta, KvbmMetadata) and meta.preempted and self._copier is not None:
            self._copier.reads_done()

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvbmMetadata)
        self._load_errors.update(meta.failed)
        self._step_bad = set(meta.failed)
        if not meta.loads:
            return
        node = self._attached()
        if node is not None and node[0].arena_name != meta.arena:
            self._reattach()  # the node restarted since this attachment was made
            node = self._attached()
        for load in meta.loads:
            same_node = node is not None and node[0].arena_name == meta.arena
            try:
                if not same_node:
                    raise NodeError("the node's arena is not the one the loads were pinned in")
                copier = self._copies(node)  # type: ignore[arg-type]
                ticket = copier.load(load.slots[self._rank], load.block_ids)
            except (NodeError, KvbmError, ValueError) as e:
                ticket = Ticket(self.geometry.num_layers)
                ticket.end(e)
            self._loading.append((load, ticket, meta.arena))
        if not self._async:
            self._finish_loads()

    def wait_for_layer_load(self, layer_name: str) -> None:
        i = self._layer_of.get(layer_name)
        for _, ticket, _ in self._loading:
            if i is None:
                ticket.wait()
            else:
                ticket.wait_layer(i)

    def _finish_loads(self) -> None:
        """Every load of the step has ended: failures go to vLLM (which
        recomputes them), and the pins are released whatever the copy did
        (the lease is the scheduler's; left alone it would pin the blocks
        until that connection ends)."""
        loading, self._loading = self._loading, []
        node = self._node
        for load, ticket, arena in loading:
            error = ticket.wait()
            if error is not None:
                log.warning(
                    "load failed, vLLM recomputes blocks=%d: %s", len(load.block_ids), error
                )
                self._load_errors.update(load.block_ids)
                self._step_bad.update(load.block_ids)
                self._tainted.add(load.req_id)
            if node is not None and node[0].arena_name == arena:
                try:
                    node[0].complete_load(load.leases[self._rank])
                except NodeError as e:
                    self._lost(e)
                    node = None

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # blocks are saved whole, all layers at once, after the forward

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvbmMetadata)
        self._finish_loads()
        self._tainted -= set(meta.released)
        if self._async:  # what the scheduler delays freeing for, whatever happens here
            self._had_saves.update(save.req_id for save in meta.saves)
        if not meta.saves or self._kv is None:
            return
        # A step's KV over a block that did not load is wrong in every
        # request holding that block (vLLM shares blocks between requests).
        bad = self._step_bad
        for save in meta.saves:
            if save.req_id in self._tainted or not bad.isdisjoint(save.block_ids):
                self._tainted.add(save.req_id)
        node = self._attached()
        if node is None:
            return
        try:
            copier = self._copies(node)
            for save in meta.saves:
                if save.req_id in self._tainted:
                    continue  # computed over blocks that never loaded here
                keys = node[0].keys(save.seq_hashes)
                for at in range(0, len(keys), node[0].step_blocks):
                    chunk = keys[at : at + node[0].step_blocks]
                    part = save.groups.part(at, len(chunk)) if save.groups else None
                    slots, positions, lease = node[0].reserve(chunk, part)
                    ids = [save.block_ids[at + p] for p in positions]
                    ticket = copier.save(ids, slots) if slots else _ended()
                    self._saving.append(_Saving(ticket, lease, save.req_id))
                    self._in_flight[save.req_id] = self._in_flight.get(save.req_id, 0) + 1
        except (NodeError, KvbmError) as e:
            self._lost(e)  # a save that does not happen is a future miss, nothing worse
            return
        if not self._async:
            self._commit_saves(wait=True)

    def _commit_saves(self, wait: bool, commit: bool = True) -> None:
        """Commit (or give back) the slots of saves that have ended, in the
        order they started; with `wait`, all of them. Without `commit` (the
        attachment is going) they are only waited for: the node settles a
        closed connection's reservations itself."""
        node = self._node if commit else None
        lost: NodeError | None = None
        while self._saving and (wait or self._saving[0].ticket.done()):
            saving = self._saving.pop(0)
            error = saving.ticket.wait()
            if error is not None:
                log.warning("save failed, its blocks are not stored: %s", error)
            left = self._in_flight.get(saving.req_id, 1) - 1
            if left:
                self._in_flight[saving.req_id] = left
            else:
                self._in_flight.pop(saving.req_id, None)
            if node is not None and lost is None:
                try:
                    node[0].commit(saving.lease, error is None)
                except NodeError as e:
                    lost = e  # the node is gone, and its reservations with it
        if lost is not None:
            self._lost(lost)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, None]:
        """Requests whose saves have all ended (async copies): vLLM may now
        free their blocks. Each rank reports each request it was told saves
        of, so the scheduler hears from every rank."""
        self._commit_saves(wait=False)
        self._tainted -= finished_req_ids
        if not self._async:
            return None, None
        self._finishing |= finished_req_ids & self._had_saves
        self._had_saves -= finished_req_ids
        done = {r for r in self._finishing if r not in self._in_flight}
        self._finishing -= done
        for r in done:
            log.debug("saves ended, blocks back to vLLM: request %s", r)
        return done or None, None

    def _drain(self) -> None:
        """Wait for every copy in flight and close the copier, before the
        arena it copies to is unmapped."""
        for _, ticket, _ in self._loading:
            ticket.wait()
        self._commit_saves(wait=True, commit=False)
        if self._copier is not None:
            self._copier.close()
            self._copier = None

    def get_block_ids_with_load_errors(self) -> set[int]:
        # With speculative decoding vLLM asks before wait_for_save: the loads
        # have ended (the forward waited for them), so settle them now.
        if self._loading:
            self._finish_loads()
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        self._commit_saves(wait=True)
        self._drain()
        for a in self._node or []:
            a.close()
        self._node = None
        if self._private is not None and self._private.poll() is None:
            self._private.terminate()


@dataclass
class _Saving:
    """A save in flight: its copy, and the node's reservation it fills."""

    ticket: Ticket
    lease: int
    req_id: str


def _ended() -> Ticket:
    ticket = Ticket(0)
    ticket.end()
    return ticket


def _hold(tracked: _Tracked, bad: set[int]) -> None:
    """Hold a request's saves from its first block in `bad` on."""
    for i, block in enumerate(tracked.block_ids):
        if block in bad:
            tracked.hold_from = i if tracked.hold_from is None else min(tracked.hold_from, i)
            tracked.saved = min(tracked.saved, i)
            return


def _hashes(p: _Promise) -> list[int]:
    return p.tracked.seq_hashes[p.first : p.first + len(p.block_ids)]


def _groups(p: _Promise) -> Groups:
    return Groups.of(p.tracked.seq_hashes, p.first, p.first + len(p.block_ids))


def _layer_index(name: str) -> int:
    found = re.findall(r"\.(\d+)\.", f".{name}.")
    if not found:
        raise KvbmError(f"cannot tell the layer index of KV cache {name!r}")
    return int(found[-1])
