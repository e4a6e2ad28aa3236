"""An engine without a model, for the connector's scheduler-side tests:
vLLM's real `Scheduler` (which builds the scheduler-side `KvbmConnector`
itself, from the `kv_transfer_config`) and a worker-side `KvbmConnector`
over a real CPU KV cache, stepped by hand the way vLLM's engine core and
model runner call them. No engine process, no weights: a step takes
milliseconds.

The forward is a stand-in that keeps the one property the connector's
correctness rests on: a block's KV depends on the KV of the block before
it in the cache (of the blocks a sliding window covers: `reach`), and on
the block's own tokens. It fills every block it computes with
`block_value(those blocks' values, the block's tokens)`, read from the
cache, in each KV cache group's own blocks (a hybrid model's groups number
their blocks apart). KV computed over a block that never loaded is
therefore wrong, as a model's would be, and `expected_values(tokens)` says
what every full block must hold. vLLM may
hand a preempted request's blocks to another request in the very step it
preempts it: the stand-in acts that out by zeroing those no other request
holds before its forward."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from vllm import SamplingParams
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.utils import get_pp_indices
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheSpec,
)
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

from kvbm.connector.attach import NodeAttachment
from kvbm.connector.engine_kv import EngineKV, new_caches
from kvbm.connector.vllm import KvbmConnector, KvbmMetadata, kv_transfer_config
from kvbm.connector.vllm.engine_setup import window_of
from kvbm.connector.vllm.scheduler import KvbmScheduler
from tests.harness.node_daemon import until

BLOCK = 32
LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(2)]  # tests/tiny_llama.py's
KV_HEADS, HEAD_SIZE = 2, 32
MODULUS = 65521  # block values stay integers a float32 holds exactly


def block_value(seen: list[int], tokens: list[int]) -> int:
    """The stand-in model's KV of one block (never 0: a block no one wrote),
    over the values of the blocks before it that its tokens attend to."""
    previous = 0
    for v in seen:
        previous = previous * 7 + v  # the block just before alone: its value
    mixed = sum((i + 1) * t for i, t in enumerate(tokens))
    return 1 + (previous * 131 + mixed) % MODULUS


def expected_values(tokens: list[int], reach: int = 1, dcp: int = 1, rank: int = 0) -> list[int]:
    """What each full block of `tokens` holds when computed right, by a model
    whose tokens attend `reach` blocks back (a sliding window's blocks).
    Under decode context parallelism over `dcp` ranks a block spans `dcp`
    times BLOCK tokens, and rank `rank`'s share holds every dcp-th of them."""
    span, values = BLOCK * dcp, []
    for at in range(0, len(tokens) - span + 1, span):
        share = list(tokens[at : at + span][rank::dcp])
        values.append(block_value(values[-reach:] if values else [], share))
    return values


def next_token(tokens: list[int]) -> int:
    """The stand-in model's greedy choice: fixed by the tokens so far."""
    return 4 + (sum(tokens[-3:]) * 7 + len(tokens)) % 500


class SteppedEngine:
    """vLLM's scheduler and one worker's connector, one `step()` at a time.

    `metas` keeps every step's connector metadata and `outputs` every
    step's scheduler output, for the tests to read what was planned."""

    def __init__(
        self,
        model: ModelConfig,
        socket: str,
        num_blocks: int = 64,
        prefix_caching: bool = False,
        policy: str = "recompute",
        copies: str = "sync",
        spec: KVCacheSpec | list[KVCacheSpec] | None = None,
        remote: str = "",
        stages: int = 1,
        reach: int = 1,
        dcp: int = 1,
    ) -> None:
        """`reach`: the blocks back each block's tokens attend to (a sliding
        window's; 1 for full attention, whose KV the block before carries).
        `dcp`: decode context parallel ranks (as many tensor-parallel
        workers), each holding every dcp-th token of a block of dcp * BLOCK
        tokens in a BLOCK-token block of its own cache."""
        self.reach, self.dcp, self.span = reach, dcp, BLOCK * dcp
        # the model's layers (tests/harness/tiny_llama.py's 2, or as its config says)
        self.names = [
            f"model.layers.{i}.self_attn.attn" for i in range(model.get_total_num_hidden_layers())
        ]
        extra = {"node": socket, "engine_copies": copies, "remote_tiers": remote}
        config = VllmConfig(
            model_config=model,
            scheduler_config=SchedulerConfig(
                max_num_seqs=16,
                max_num_batched_tokens=1024,
                max_model_len=1024,
                enable_chunked_prefill=True,
                is_encoder_decoder=False,
            ),
            cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=prefix_caching),
            kv_transfer_config=kv_transfer_config(extra, policy),
            device_config=DeviceConfig("cpu"),
            parallel_config=ParallelConfig(
                pipeline_parallel_size=stages,
                tensor_parallel_size=dcp,
                decode_context_parallel_size=dcp,
            ),
        )
        spec = spec or FullAttentionSpec(
            block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE, dtype=torch.float32
        )
        if isinstance(spec, list):  # one group per layer, as a hybrid model's
            groups = [KVCacheGroupSpec([n], s) for n, s in zip(self.names, spec, strict=True)]
        else:
            groups = [KVCacheGroupSpec(self.names, spec)]
        # each layer's group, and the blocks back its tokens attend to
        self.group_of = {n: g for g, group in enumerate(groups) for n in group.layer_names}
        windowed = [window_of(g.kv_cache_spec) is not None for g in groups]
        self.reach_of = [reach if w else 1 for w in windowed]
        if stages > 1:  # each stage's workers hold its layers; the scheduler sees stage 0's
            parts = [get_pp_indices(len(self.names), r, stages) for r in range(stages)]
            staged = [self.names[start:end] for start, end in parts]
            caches = [KVCacheConfig(num_blocks, [], [KVCacheGroupSpec(n, spec)]) for n in staged]
        else:  # one worker, or one per DCP rank, each holding every layer
            staged = [self.names] * dcp
            caches = [KVCacheConfig(num_blocks, [], groups)] * dcp
        config.cache_config.num_gpu_blocks = num_blocks
        self.scheduler = Scheduler(
            vllm_config=config,
            kv_cache_config=caches[0],
            structured_output_manager=StructuredOutputManager(config),
            block_size=self.span,
        )
        assert isinstance(self.scheduler.connector, KvbmConnector)
        self.connector: KvbmScheduler = self.scheduler.connector.scheduler  # type: ignore[assignment]
        # one worker per stage or DCP rank, ranked as vLLM numbers them (kvbm/block_key.py)
        self.workers = [KvbmConnector(config, KVConnectorRole.WORKER, c) for c in caches]
        # vLLM's CPU cache layout: [blocks, KV heads, block tokens, K and V]
        heads = (spec[0] if isinstance(spec, list) else spec).num_kv_heads
        shape = (num_blocks, heads, BLOCK, 2 * HEAD_SIZE)
        # each worker's layers: a stage's own, or every layer for each DCP rank
        self.shards = [{n: torch.zeros(shape) for n in names} for names in staged]
        self.kv = {n: t for shard in self.shards for n, t in shard.items()}  # dcp: rank 0's
        if dcp > 1:
            self.kv = self.shards[0]
        self.staged = staged
        for rank, (worker, shard) in enumerate(zip(self.workers, self.shards, strict=True)):
            assert worker.worker is not None
            worker.worker.register_kv_caches(shard, rank=rank)
        init_none_hash(sha256)
        self._hasher = get_request_block_hasher(self.span, sha256)
        self.metas: list[KvbmMetadata] = []
        self.outputs: list[SchedulerOutput] = []
        self._held: dict[str, list[int]] = {}  # each request's blocks after the last step
        # workers that reported a request's saves done ("sending") or load received
        self._finished: dict[tuple[str, str], int] = {}
        self._failed_recving: set[str] = set()

    def add(self, req_id: str, tokens: list[int], max_tokens: int = 16) -> Request:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        request = Request(req_id, list(tokens), params, None, block_hasher=self._hasher)
        self.scheduler.add_request(request)
        return request

    def block_ids(self, req_id: str, group: int = 0) -> list[int]:
        return list(self.scheduler.kv_cache_manager.get_block_ids(req_id)[group])

    def layers(self, group: int = 0, rank: int = 0) -> list[torch.Tensor]:
        kv = self.shards[rank] if self.dcp > 1 else self.kv
        return [t for name, t in kv.items() if self.group_of.get(name, 0) == group]

    def values(self, block_ids: list[int], group: int = 0, rank: int = 0) -> list[int]:
        """The value each block of `group` holds (DCP rank `rank`'s share),
        the same in every byte of the group's layers as the forward writes
        it; -1 for a block that is not one value."""
        got = []
        layers = self.layers(group, rank)
        for b in block_ids:
            first = layers[0][b, 0, 0, 0]
            whole = all(bool((layer[b] == first).all()) for layer in layers)
            got.append(int(first) if whole else -1)
        return got

    def step(self) -> None:
        """One engine step: schedule, the worker's hooks around the stand-in
        forward, and the model runner's output back to the scheduler."""
        out = self.scheduler.schedule()
        meta = out.kv_connector_metadata
        assert isinstance(meta, KvbmMetadata)
        self.metas.append(meta)
        self.outputs.append(out)
        for worker in self.workers:
            worker.handle_preemptions(meta)
            worker.bind_connector_metadata(meta)
            worker.start_load_kv(None)  # type: ignore[arg-type]
            for layer in self.names:
                worker.wait_for_layer_load(layer)
        sampled = self._forward(out)
        errors: set[int] = set()
        done = {"sending": set(), "recving": set()}
        for worker in self.workers:
            worker.wait_for_save()
            results = worker.get_transfer_results(out.finished_req_ids)
            self._failed_recving |= results.failed_recving
            told = {"sending": results.finished_sending, "recving": results.finished_recving}
            for kind, req_ids in told.items():
                for req_id in req_ids:
                    # vLLM's output aggregator: finished once every worker said so
                    count = self._finished[kind, req_id] = self._finished.get((kind, req_id), 0) + 1
                    if count == len(self.workers):
                        done[kind].add(req_id)
                        del self._finished[kind, req_id]
            errors |= worker.get_block_ids_with_load_errors()
            worker.clear_connector_metadata()
        failed = self._failed_recving & done["recving"]
        self._failed_recving -= failed
        ids = list(sampled)
        runner = ModelRunnerOutput(
            req_ids=ids,
            req_id_to_index={r: i for i, r in enumerate(ids)},
            sampled_token_ids=[sampled[r] for r in ids],
            kv_connector_output=KVConnectorOutput(
                finished_sending=done["sending"] or None,
                finished_recving=done["recving"] or None,
                failed_recving=failed,
                invalid_block_ids=errors,
            ),
        )
        self.scheduler.update_from_output(out, runner)

    def _forward(self, out: SchedulerOutput) -> dict[str, list[int]]:
        """Fill every block this step computes, and sample where a request's
        tokens are all computed (vLLM drops a partial prefill's sample)."""
        pool = self.scheduler.kv_cache_manager.block_pool.blocks
        for req_id in out.preempted_req_ids or ():
            held = self._held.pop(req_id, [])
            freed = [b for b in held if b and pool[b].ref_cnt == 0]
            for layer in (t for shard in self.shards for t in shard.values()):
                layer[freed] = 0.0  # reused at once, by whoever vLLM gives them to
        before = {new.req_id: new.num_computed_tokens for new in out.scheduled_new_reqs}
        cached = out.scheduled_cached_reqs
        before.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        sampled: dict[str, list[int]] = {}
        for req_id, n in out.num_scheduled_tokens.items():
            request = self.scheduler.requests[req_id]
            tokens = request.all_token_ids
            self._held[req_id] = []
            start, end = before[req_id], before[req_id] + n
            span = self.span
            for g, reach in enumerate(self.reach_of):
                ids = self.block_ids(req_id, g)
                self._held[req_id] += ids
                for b in range(start // span, (end - 1) // span + 1):
                    block = tokens[b * span : min(end, (b + 1) * span)]
                    for r in range(self.dcp):  # each rank's share: every dcp-th token
                        seen = self.values(ids[max(0, b - reach) : b], g, r)  # null block's: 0
                        value = block_value(seen, list(block[r :: self.dcp]))
                        for layer in self.layers(g, r):
                            layer[ids[b]].fill_(float(value))
            done = request.num_computed_tokens >= request.num_tokens
            sampled[req_id] = [next_token(list(tokens))] if done else []
        return sampled

    def admit(self, req_id: str, tokens: list[int]) -> int:
        """Run `tokens` as a new request until vLLM first schedules it (a
        hit loaded asynchronously, `Load.waiting`, waits a step); the tokens
        vLLM counted computed then: its own prefix hit and what the
        connector promised."""
        self.add(req_id, tokens)
        for _ in range(10):
            self.step()
            for new in self.outputs[-1].scheduled_new_reqs:
                if new.req_id == req_id:
                    return new.num_computed_tokens
        raise AssertionError(f"{req_id} was never scheduled")

    def hold(self, socket: str, tokens: list[int], blocks: list[int], rank: int = 0) -> None:
        """Store these blocks of `tokens` in the node, rank `rank`'s share,
        holding what this engine's stand-in model computes: as if the node
        held them alone, the rest of the prompt evicted."""
        setup = self.connector.setup
        probe = NodeAttachment(socket, setup.geometry, rank=rank)
        try:
            seed = probe.hasher.seed(setup.model_identity)
            hashes = probe.hasher.sequence_hashes(tokens, BLOCK, seed)
            names = self.staged[rank] if len(self.staged) > 1 else self.names
            kv = new_caches(probe.geometry, len(blocks) + 1)[: len(names)]
            for name, layer in zip(names, kv, strict=True):  # a slot's layers in layer order
                values = expected_values(tokens, self.reach_of[self.group_of.get(name, 0)])
                for i, b in enumerate(blocks):
                    layer[i + 1] = float(values[b])
            keys = probe.keys([hashes[b] for b in blocks])
            share = EngineKV(probe.geometry, kv, stage=len(self.staged) > 1)
            probe.store(share, keys, list(range(1, len(blocks) + 1)))
        finally:
            probe.close()

    def evict_after_promising(
        self, probe: NodeAttachment, req_id: str, held: slice
    ) -> Callable[..., None]:
        """A stand-in for the scheduler's `update_state_after_alloc` that,
        once vLLM has allocated for a promise, floods the node until
        `req_id`'s blocks `held` are gone from it: the race of a hit whose
        blocks go between its promise and the step's pin, forced."""
        promised = self.connector.update_state_after_alloc

        def promise_then_evict(request: Request, blocks: object, num_external_tokens: int) -> None:
            promised(request, blocks, num_external_tokens)  # type: ignore[arg-type]
            self.flood(probe)
            keys = probe.keys(self.connector.requests[req_id].seq_hashes[held])
            # the node's answers follow its evictions a moment later
            until(lambda: probe.lookup(keys).total == 0, 10, f"{req_id}'s blocks outlived it")

        return promise_then_evict

    @staticmethod
    def flood(probe: NodeAttachment) -> None:
        """Store twice the node's slots of filler blocks through `probe`:
        nothing stored before them is left in its host tier (the node's
        answers follow its evictions a moment later)."""
        filler = probe.keys(list(range(10**6, 10**6 + 2 * probe.num_slots)))
        kv = new_caches(probe.geometry, len(filler) + 1)
        probe.store(EngineKV(probe.geometry, kv), filler, list(range(1, len(filler) + 1)))

    def run(self, timeout: float = 60.0) -> None:
        """Step until every request is finished and its blocks given back;
        a step with nothing to compute waits a little, as a serving engine's
        loop does while saves in flight end."""
        deadline = time.monotonic() + timeout
        while self.scheduler.has_requests() or self.scheduler.requests:
            if time.monotonic() > deadline:
                raise AssertionError(f"requests left: {list(self.scheduler.requests)}")
            self.step()
            if not self.outputs[-1].total_num_scheduled_tokens:
                time.sleep(0.005)

    def abort(self, req_ids: list[str]) -> None:
        self.scheduler.finish_requests(req_ids, RequestStatus.FINISHED_ABORTED)

    def close(self) -> None:
        for worker in self.workers:
            worker.shutdown()
        self.scheduler.shutdown()
