"""The worker side of the vLLM connector (each worker process, one per
rank: pipeline stage and tensor-parallel rank, kvbm/block_key.py).

A load starts in `start_load_kv` and the forward waits for each layer in
`wait_for_layer_load`; the pins are released after the forward. After the
forward (`wait_for_save`) the completed blocks are reserved in the node and
copied into its arena; `engine_copies` says whether they are committed at
once (sync) or in a later step's `get_finished`, the request's blocks kept
from vLLM until then (async; `handle_preemptions` waits until saves in
flight have read the blocks of preempted requests). Whole blocks, one torch
op per span of blocks for every layer (kvbm/connector/copy.py, any of vLLM's
KV cache layouts; a GPU's through a staging buffer, kvbm/connector/cuda.py).
A load that fails is reported through `get_block_ids_with_load_errors`, so
vLLM recomputes (with `kv_load_failure_policy` "recompute").
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

from kvbm.connector.attach import NodeAttachment, NodeError
from kvbm.connector.engine_kv import EngineKV
from kvbm.connector.transfers import Copier, SyncCopier, ThreadCopier, Ticket
from kvbm.connector.vllm.engine_setup import EngineSetup
from kvbm.connector.vllm.metadata import KvbmMetadata, Load
from kvbm.connector.vllm.node_link import NodeLink
from kvbm.errors import KvbmError

log = logging.getLogger("kvbm.connector.vllm")


@dataclass
class Saving:
    """A save in flight: its copy, and the node's reservation it fills."""

    ticket: Ticket
    lease: int
    req_id: str


class KvbmWorker:
    """The worker role's state: vLLM's KV cache, the copier into the node's
    arena, loads and saves in flight, requests tainted by a failed load.
    Built only in the worker role.

    Invariants: every load started is settled (its pins released) once the
    forward has waited for it; every save started is committed or given back
    in the order it started, and `_in_flight` counts those not yet settled
    per request; with async copies a request is reported finished only once
    it has none in flight; a tainted request saves nothing until the
    scheduler releases it (`KvbmMetadata.released`) or it finishes."""

    def __init__(self, setup: EngineSetup) -> None:
        self.setup = setup
        self.link = NodeLink(setup, map_arena=True, before_close=self._drain)
        self._rank = 0
        self._kv: EngineKV | None = None
        self._layer_of: dict[str, int] = {}
        self._copier: Copier | None = None
        self._copier_arena = ""
        self._loading: list[tuple[Load, Ticket, str]] = []  # with the arena pinned in
        self._saving: list[Saving] = []
        self._in_flight: dict[str, int] = {}  # saves started and not committed, per request
        self._had_saves: set[str] = set()  # requests the scheduler planned saves for
        self._finishing: set[str] = set()  # finished, waiting for their saves
        self._load_errors: set[int] = set()
        # Requests computed over blocks that did not load here: no saves
        # until the scheduler has seen vLLM recompute them (meta.released).
        self._tainted: set[str] = set()
        self._step_bad: set[int] = set()  # blocks of this step that did not load
        # Waiting loads (Load.waiting) ended since vLLM last asked: request -> loaded?
        self._received: dict[str, bool] = {}

    def _attached(self) -> list[NodeAttachment] | None:
        return self.link.attached([self._rank])

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor], rank: int) -> None:
        """vLLM's KV cache of worker `rank` (its stage's layers, its heads),
        one tensor per layer."""
        self._rank = rank
        if self.setup.off:
            return
        try:
            layers = sorted(kv_caches.items(), key=lambda item: layer_index(item[0]))
            groups_named = enumerate(self.setup.groups)
            group_of = {n: g for g, group in groups_named for n in group.layer_names}
            if group_of and set(kv_caches) != set(group_of):
                raise KvbmError(
                    f"vLLM's KV caches {sorted(kv_caches)} are not its KV cache groups' layers"
                )
            groups = [group_of.get(name, 0) for name, _ in layers]
            stage = self.setup.stages > 1  # a stage may hold fewer layers than another
            kv = EngineKV(self.setup.geometry, [t for _, t in layers], groups, stage)
            if kv.device.type not in ("cpu", "cuda"):
                raise KvbmError(f"kvbm copies CPU and CUDA caches, not {kv.device.type}")
            self._kv = kv
            # a ticket counts layers in copy order (group by group, kv.layer_order)
            position = {layer: k for k, layer in enumerate(kv.layer_order)}
            self._layer_of = {name: position[i] for i, (name, _) in enumerate(layers)}
        except KvbmError as e:
            log.error("kvbm disabled: vLLM's KV cache does not match the geometry: %s", e)
            self._kv = None
            return
        node = self._attached()  # now, not in the first request's step
        if node is not None:
            try:
                self._copies(node)  # a GPU's: pins the arena now, not in the first step
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
            elif self.setup.async_copies:
                self._copier = ThreadCopier(blocks, kv)
            else:
                self._copier = SyncCopier(blocks, kv)
            self._copier_arena = arena
            log.info("copies between vLLM's KV cache and the node: %s", type(self._copier).__name__)
        return self._copier

    def handle_preemptions(self, meta: KvbmMetadata) -> None:
        """Before the step's forward: preempted requests' blocks, and blocks
        behind a sliding window, go back to vLLM at once, so saves still
        reading them must have read them."""
        if meta.blocks_reused and self._copier is not None:
            self._copier.reads_done()

    def start_load_kv(self, meta: KvbmMetadata) -> None:
        self._load_errors.update(meta.failed)
        self._step_bad = set(meta.failed)
        self._received.update(dict.fromkeys(meta.failed_waits, False))
        if not meta.loads:
            return
        node = self._attached()
        if node is not None and node[0].arena_name != meta.arena:
            self.link.reattach()  # the node restarted since this attachment was made
            node = self._attached()
        for load in meta.loads:
            if not load.count:  # a waiting request with nothing to load
                self._received[load.req_id] = True
                continue
            same_node = node is not None and node[0].arena_name == meta.arena
            try:
                if not same_node:
                    raise NodeError("the node's arena is not the one the loads were pinned in")
                copier = self._copies(node)  # type: ignore[arg-type]
                ticket = copier.load(load.slots[self._rank], load.block_ids)
            except (NodeError, KvbmError, ValueError) as e:
                ticket = Ticket(self.setup.geometry.num_layers)
                ticket.end(e)
            self._loading.append((load, ticket, meta.arena))
        if not self.setup.async_copies:
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
        node = self.link.current
        for load, ticket, arena in loading:
            error = ticket.wait()
            if error is not None:
                log.warning("load failed, vLLM recomputes blocks=%d: %s", load.count, error)
            if load.waiting:  # reported whole, in get_transfer_results
                self._received[load.req_id] = error is None
            elif error is not None:  # one group: its blocks are vLLM's to roll back
                self._load_errors.update(load.block_ids[0])
                self._step_bad.update(load.block_ids[0])
                self._tainted.add(load.req_id)
            if node is not None and node[0].arena_name == arena:
                try:
                    node[0].complete_load(load.leases[self._rank])
                except NodeError as e:
                    self.link.lost(e)
                    node = None

    def wait_for_save(self, meta: KvbmMetadata) -> None:
        self._finish_loads()
        self._tainted -= set(meta.released)
        if self.setup.async_copies:  # what the scheduler delays freeing for, whatever happens here
            self._had_saves.update(save.req_id for save in meta.saves)
        if not meta.saves or self._kv is None:
            return
        # A step's KV over a block that did not load is wrong in every
        # request holding that block (vLLM shares blocks between requests).
        bad = self._step_bad
        for save in meta.saves:
            if save.req_id in self._tainted or any(not bad.isdisjoint(g) for g in save.block_ids):
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
                    ids = [[g[at + p] for p in positions] for g in save.block_ids]
                    ticket = copier.save(ids, slots) if slots else _ended()
                    self._saving.append(Saving(ticket, lease, save.req_id))
                    self._in_flight[save.req_id] = self._in_flight.get(save.req_id, 0) + 1
        except (NodeError, KvbmError) as e:
            self.link.lost(e)  # a save that does not happen is a future miss, nothing worse
            return
        if not self.setup.async_copies:
            self._commit_saves(wait=True)

    def _commit_saves(self, wait: bool, commit: bool = True) -> None:
        """Commit (or give back) the slots of saves that have ended, in the
        order they started; with `wait`, all of them. Without `commit` (the
        attachment is going) they are only waited for: the node settles a
        closed connection's reservations itself."""
        node = self.link.current if commit else None
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
            self.link.lost(lost)

    def get_finished(self, finished_req_ids: set[str]) -> set[str] | None:
        """Requests whose saves have all ended (async copies): vLLM may now
        free their blocks. Each rank reports each request it was told saves
        of, so the scheduler hears from every rank."""
        self._commit_saves(wait=False)
        self._tainted -= finished_req_ids
        if not self.setup.async_copies:
            return None
        self._finishing |= finished_req_ids & self._had_saves
        self._had_saves -= finished_req_ids
        done = {r for r in self._finishing if r not in self._in_flight}
        self._finishing -= done
        for r in done:
            log.debug("saves ended, blocks back to vLLM: request %s", r)
        return done or None

    def take_received(self) -> tuple[set[str], set[str]]:
        """Waiting requests whose loads have ended since the last call, and
        those of them that failed (vLLM recomputes them from the first
        token). Every load of the step has ended by now (wait_for_save)."""
        if self._loading:
            self._finish_loads()
        received, self._received = self._received, {}
        return set(received), {r for r, ok in received.items() if not ok}

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
        self.link.close()


def _ended() -> Ticket:
    ticket = Ticket(0)
    ticket.end()
    return ticket


def layer_index(name: str) -> int:
    """The layer number in a KV cache's name (`model.layers.3.self_attn.attn`: 3)."""
    found = re.findall(r"\.(\d+)\.", f".{name}.")
    if not found:
        raise KvbmError(f"cannot tell the layer index of KV cache {name!r}")
    return int(found[-1])
