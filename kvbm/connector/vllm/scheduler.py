"""The scheduler side of the vLLM connector (vLLM's engine-core process).

For a new request, hash its prompt's full blocks (`kvbm.hashing`) and read
the node's key view (kvbm/key_view.py, shared memory, no round trip) for the
longest prefix it could serve beyond vLLM's own prefix-cache hit: a miss
costs the scheduler that read alone. With `kv_load_failure_policy`
"recompute" a hit is promised as the view shows it, and the step's hits are
pinned in one `load_many` when the step's metadata is built (the node
stages its disk and pulls from peers then); a block gone meanwhile is
reported failed by the workers and vLLM recomputes from it. With "fail"
such a block would fail its request, so a hit is pinned before it is
promised. The metadata of the step carries (arena slots -> vLLM block ids)
per load, and the full blocks each request completes in that step: prompt
and generated tokens alike, so a chat's next turn (this turn's prompt and
answer, then a new message) finds the answer's blocks too. Their sequence
hashes continue over the generated tokens as they are generated, exactly as
the next turn's prompt hashes them.

A block that did not load (the scheduler's pins came short, or a worker's
copy failed) is recomputed by vLLM, and until vLLM has rolled a request back
to it, nothing computed over it is saved: not by that request, nor by one
sharing the block through vLLM's prefix cache, nor in the steps vLLM
scheduled before it saw the failure (the scheduler holds the request's saves
until its computed tokens come back to the block, then tells the workers).
Not yet: where one tensor-parallel rank's copy failed, the other ranks'
saves of that step (their KV depends on it through the all-reduce).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from kvbm.block_key import Groups
from kvbm.connector.attach import NodeAttachment, NodeError
from kvbm.connector.attention_window import NULL_BLOCK, leading_nulls, loaded_ids
from kvbm.connector.identity import Unnameable, prompt_hashes
from kvbm.connector.vllm.engine_setup import EngineSetup
from kvbm.connector.vllm.metadata import KvbmMetadata, Load, Save
from kvbm.connector.vllm.node_link import NodeLink
from kvbm.connector.vllm.stats import NOT_CACHED, KvbmStats
from kvbm.connector.vllm.tracked import Promise, TrackedRequest
from kvbm.engine_wire import MAX_KEYS

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvbm.connector.vllm")


class KvbmScheduler:
    """The scheduler role's state: tracked requests, this step's loads and
    promises, holds after a failed load. Built only in the scheduler role.

    Invariants: every lease this side takes is in a `Load` that is either
    sent to the workers in one step's metadata (they settle it) or released
    here (`drop_pins`, a failed promise); a request vLLM has finished holds
    no lease and is no longer tracked."""

    def __init__(self, setup: EngineSetup) -> None:
        self.setup = setup
        self.block_size = setup.block_size
        self.link = NodeLink(setup, map_arena=False)
        self.stats = KvbmStats()  # counts vLLM takes each step (kvbm/connector/vllm/stats.py)
        self.requests: dict[str, TrackedRequest] = {}
        self._to_load: list[Load] = []
        self._promises: list[Promise] = []
        self._failed_waits: list[str] = []  # waiting loads that came to nothing before a step
        # Attached now, with the engine starting: a node's first hello makes
        # its arena for the geometry (0.4 s for 512 MiB here), which the
        # engine's first request would otherwise wait for.
        if not setup.off:
            self._attached()

    def _attached(self) -> list[NodeAttachment] | None:
        return self.link.attached(range(self.setup.ranks))

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        tracked = self._track(request)
        self.drop_pins(tracked)
        tracked.promised, tracked.waiting = 0, False
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
        if self.setup.window is not None and self.setup.promise_hits:
            held = [a.held(k) for a, k in zip(node, keys, strict=True)]
            if all(h is not None for h in held):
                return self._windowed_hit(tracked, node[0].step_blocks, held, first)
        seen = [a.seen(k) for a, k in zip(node, keys, strict=True)]
        if all(s is not None for s in seen):
            n = min(s.total for s in seen)  # type: ignore[union-attr]
            if n == 0:
                return 0, False  # a miss, told by the view: the node is not asked
            if self.setup.promise_hits:
                tracked.promised = min(n, node[0].step_blocks)
                tracked.first_block, tracked.waiting = first, self.setup.waits
                return tracked.promised * self.block_size, tracked.waiting
        # A windowed group pins the window of the whole hit alone first: the
        # hit then holds where the prefix's early blocks are gone, and a
        # peer's blocks behind the window are not pulled. Where that window
        # is not held, the prefix as for full attention.
        window, lo = self.setup.window, first
        if window is not None:
            lo = int(window.first_loaded(usable, first))
        load = self._pin_from(node, keys, groups, first, lo)
        if load is None and lo > first and self.link.current is not None:
            lo = first
            load = self._pin_from(node, keys, groups, first, lo)
        if load is None:
            return 0, False
        tracked.pinned, tracked.first_block, tracked.pinned_from = load, first, lo
        tracked.waiting = load.waiting = self.setup.waits
        m = len(load.slots[0])
        log.debug("pinned blocks=%d ms=%.2f", m, (time.perf_counter() - t0) * 1e3)
        return (lo + m - first) * self.block_size, tracked.waiting

    def _pin_from(
        self, node: list[NodeAttachment], keys: list, groups: Groups, first: int, lo: int
    ) -> Load | None:
        """Pin on every rank the longest held run of the keys from block `lo`
        (`keys` start at `first`), or None (nothing, or a run too short for
        a window whose hit would reach behind `lo`)."""
        pinned: list = []
        try:
            for a, k in zip(node, keys, strict=True):
                n = len(k) - (lo - first)
                pinned.append(a.prepare_load(k[lo - first :], groups.part(lo - first, n)))
                if not pinned[-1].slots:
                    break
        except NodeError as e:
            self.link.release(Load([p.lease for p in pinned], [], []))
            self.link.lost(e)
            return None
        m = min(len(p.slots) for p in pinned) if len(pinned) == len(node) else 0
        window = self.setup.window
        if window is not None and m and lo > first:
            stop = lo + m  # a short pin: a smaller hit, whose window may reach behind lo
            if window.first_loaded(stop, first) < lo:
                m = 0
        load = Load([p.lease for p in pinned], [p.slots[:m] for p in pinned], [])
        if m == 0:
            self.link.release(load)
            return None
        return load

    def _windowed_hit(
        self, tracked: TrackedRequest, step_blocks: int, held: list, first: int
    ) -> tuple[int | None, bool]:
        """The hit the key view shows for a windowed group, promised: as
        many blocks as keep every block the next token attends to held on
        every rank (kvbm/connector/attention_window.py), at most one load
        step's. Only those blocks are pinned (and pulled from peers) with
        the step. Where a hit is pinned before it is promised, the pin takes
        the whole hit's window first (`_pin_from`). Either way the load is
        asynchronous (`Load.waiting`): it can fail only whole."""
        window = self.setup.window
        assert window is not None
        mask = np.logical_and.reduce(held)[:step_blocks]
        n = window.longest_hit(mask, first) - first
        if n == 0:
            return 0, False  # a miss, told by the view
        tracked.promised, tracked.first_block, tracked.waiting = n, first, True
        return n * self.block_size, True

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        tracked = self._track(request)
        n = num_external_tokens // self.block_size
        first = tracked.first_block
        if tracked.promised:
            n, tracked.promised = min(n, tracked.promised), 0
            if n:
                ids, skip = loaded_ids(blocks.get_block_ids(), first, n)
                if skip < n or tracked.waiting:  # a waiting request hears back, even of none
                    promise = Promise(tracked, first + skip, ids, tracked.waiting)
                    self._promises.append(promise)
                tracked.saved = max(tracked.saved, first + n)  # in the node (or recomputed)
            return
        load = tracked.pinned
        if load is None:
            return
        tracked.pinned = None
        if n == 0:
            self.link.release(load)
            return
        ids, skip = loaded_ids(blocks.get_block_ids(), first, n)
        at = first + skip - tracked.pinned_from  # the slots were pinned from pinned_from on
        load.req_id = request.request_id
        if at < 0:  # vLLM took a smaller hit, whose window reaches behind the pins
            self.link.release(load)
            if load.waiting:
                self._failed_waits.append(load.req_id)
            return
        load.block_ids = ids
        load.slots = [s[at : at + load.count] for s in load.slots]
        if not load.count:
            self.link.release(load)
            load = Load([], [], [], load.req_id, load.waiting)
        if load.count or load.waiting:  # a waiting request hears back, even of none
            self._to_load.append(load)
        tracked.saved = max(tracked.saved, first + n)  # these are in the node already

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KvbmMetadata:
        node = self.link.current
        meta = KvbmMetadata(arena=node[0].arena_name if node else "", loads=self._to_load)
        meta.failed_waits, self._to_load, self._failed_waits = self._failed_waits, [], []
        if self.setup.off:
            return meta
        preempted = bool(getattr(scheduler_output, "preempted_req_ids", None))
        meta.blocks_reused = preempted or self.setup.windowed
        self._pin_promises(meta)
        bad = set(meta.failed)
        steps = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self.requests.get(new.req_id)
            if tracked is not None:
                tracked.block_ids = [list(g) for g in new.block_ids]
                self._plan_save(meta, tracked, new.num_computed_tokens, steps[new.req_id], bad)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self.requests.get(req_id)
            if tracked is None:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                if req_id in cached.resumed_req_ids:
                    tracked.block_ids = [list(g) for g in new_ids]
                else:
                    for ids, more in zip(tracked.block_ids, new_ids, strict=True):
                        ids += more
            computed = cached.num_computed_tokens[i]
            self._plan_save(meta, tracked, computed, steps[req_id], bad)
        return meta

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Blocks the workers could not load (vLLM has rolled their requests
        back by now): every request holding one saves nothing more until
        vLLM has recomputed from it. A waiting load that failed is
        recomputed from the first token: its blocks are saved again as they
        are computed (the node keeps the ones it still holds)."""
        bad = connector_output.invalid_block_ids
        if bad:
            for tracked in self.requests.values():
                tracked.hold(bad)
        for req_id in connector_output.failed_recving or ():
            tracked = self.requests.get(req_id)
            if tracked is not None:
                tracked.saved = 0

    def _pin_promises(self, meta: KvbmMetadata) -> None:
        """Pin this step's promised blocks, one round trip per rank. A block
        the node no longer has goes to `meta.failed`: the workers report it
        failed, vLLM recomputes from it, and no request holding it saves
        until then (`_plan_save`). A waiting load (`Load.waiting`) is pinned
        whole or fails whole (`meta.failed_waits`)."""
        promises, self._promises = self._promises, []
        for p in promises:
            if not p.count:  # a window's hit with nothing to load: received at once
                meta.loads.append(Load([], [], [], p.tracked.request.request_id, True))
        promises = [p for p in promises if p.count]
        if not promises:
            return
        node = self.link.current
        pins: list[list] = []
        try:
            if node is None:
                raise NodeError("the node is gone")
            for a in node:
                asked = [a.keys(p.hashes()) for p in promises]
                pins.append(a.prepare_loads(asked, [p.groups() for p in promises]))
        except NodeError as e:
            for rank in pins:
                self.link.release(Load([p.lease for p in rank], [], []))
            if node is not None:
                self.link.lost(e)
            pins = []
        short = 0
        for i, p in enumerate(promises):
            got = [rank[i] for rank in pins]
            m = min((len(g.slots) for g in got), default=0)
            if p.waiting and m < p.count:
                m = 0  # whole or not at all
            req_id = p.tracked.request.request_id
            load = Load(
                [g.lease for g in got],
                [g.slots[:m] for g in got],
                [ids[:m] for ids in p.block_ids],
                req_id,
                p.waiting,
            )
            if m:
                meta.loads.append(load)
            else:
                self.link.release(load)
            if m < p.count:
                short += 1
                if p.waiting:
                    meta.failed_waits.append(req_id)
                else:  # one group (several wait): its blocks are vLLM's to roll back
                    meta.failed += p.block_ids[0][m:]
        if short:
            log.info("promised blocks gone before pinned, vLLM recomputes requests=%d", short)

    def _plan_save(
        self,
        meta: KvbmMetadata,
        tracked: TrackedRequest,
        before: int,
        scheduled: int,
        bad: set[int],
    ) -> None:
        """Save the full blocks whose KV exists once this step has run
        (`before` tokens computed, then `scheduled` more: prompt, then
        generated ones). A request holding a block that never loaded (`bad`,
        or reported since) saves nothing until vLLM has rolled it back to
        that block; the workers are told when it may save again."""
        req_id = tracked.request.request_id
        if bad:
            tracked.hold(bad)
        if tracked.hold_from is not None:
            if before > tracked.hold_from * self.block_size or self.setup.windowed:
                # Computed over blocks that never arrived, and not yet redone.
                # Behind a window vLLM may have freed blocks it rolled back
                # over, so such a request saves nothing more.
                return
            tracked.hold_from = None
            meta.released.append(req_id)
        computed = before + scheduled
        tokens = tracked.request.all_token_ids
        held = min(len(ids) for ids in tracked.block_ids) if tracked.block_ids else 0
        full = min(min(computed, len(tokens)) // self.block_size, held)
        hashed = len(tracked.seq_hashes)
        hasher = self.link.hasher
        if tracked.seed is None or hasher is None:
            return  # not cached: its blocks have no keys
        if full > hashed:  # blocks of generated tokens: hash them on from the last one
            parent = tracked.seq_hashes[-1] if hashed else tracked.seed
            more = tokens[hashed * self.block_size : full * self.block_size]
            extras = {i - hashed: e for i, e in tracked.extras.items() if i >= hashed}
            tracked.seq_hashes += hasher.sequence_hashes(more, self.block_size, parent, extras)
        if full > tracked.saved:
            # Where any group's block is vLLM's null block (freed behind a
            # window, or never allocated there), the position is not stored:
            # a slot holds every group's layers. Nulls only lead, but be sure.
            ids = [g[tracked.saved : full] for g in tracked.block_ids]
            start = tracked.saved + max(leading_nulls(g) for g in ids)
            stop = full
            for g in tracked.block_ids:
                rest = g[start:full]
                if NULL_BLOCK in rest:
                    stop = min(stop, start + rest.index(NULL_BLOCK))
            tracked.saved = full
            if start < stop:
                span = slice(start, stop)
                groups = Groups.of(tracked.seq_hashes, start, stop)
                block_ids = [g[span] for g in tracked.block_ids]
                save = Save(tracked.seq_hashes[span], block_ids, req_id, groups)
                meta.saves.append(save)
                tracked.had_saves = True

    def request_finished(self, request: Request) -> bool:
        """Forget a finished request and give back its pins; whether vLLM
        must keep its blocks (async copies: until every worker has reported
        its saves done, in get_finished; sync ones end in their step)."""
        tracked = self.requests.pop(request.request_id, None)
        if tracked is None:
            return False
        self.drop_pins(tracked)
        keep = self.setup.async_copies and tracked.had_saves
        if keep:
            log.debug("blocks kept for saves in flight: request %s", request.request_id)
        return keep

    def take_stats(self) -> KvbmStats | None:
        """The counts since the last call, for vLLM's stats and /metrics."""
        if self.stats.is_empty():
            return None
        taken, self.stats = self.stats, KvbmStats()
        return taken

    def _track(self, request: Request) -> TrackedRequest:
        tracked = self.requests.get(request.request_id)
        if tracked is None:
            if self.link.hasher is None:
                self._attached()  # the node gives the hashing key
            tracked = self.requests[request.request_id] = self._hash_prompt(request)
        return tracked

    def _hash_prompt(self, request: Request) -> TrackedRequest:
        """A request's prompt blocks' hashes, or a request that is not cached:
        no hashing key yet (no node), or an input the hash cannot name."""
        hasher = self.link.hasher
        if hasher is None:
            return TrackedRequest(request, None, [])
        try:
            hashed = prompt_hashes(hasher, self.setup.model_identity, request, self.block_size)
        except Unnameable as e:
            self.stats.count(NOT_CACHED)
            log.info("request %s not cached: %s", request.request_id, e)
            return TrackedRequest(request, None, [])
        return TrackedRequest(request, hashed.seed, hashed.hashes, hashed.extras)

    def drop_pins(self, tracked: TrackedRequest) -> None:
        """Give back what `get_num_new_matched_tokens` pinned and vLLM did not allocate."""
        if tracked.pinned is not None:
            self.link.release(tracked.pinned)
            tracked.pinned = None

    def shutdown(self) -> None:
        self.link.close()
