"""An engine's copies against a block manager in the same process, with no
node between: what `kvbm bench tiers` and `bench transport` drive, and the
tests of the manager. The steps and copies are the engine's own
(kvbm/connector/copy.py); only the slots come from the manager directly
instead of over the node's socket."""

from __future__ import annotations

from collections.abc import Sequence

from kvbm.block_key import BlockKey
from kvbm.connector.copy import ArenaBlocks, load_in_steps, store_in_steps
from kvbm.connector.engine_kv import EngineKV
from kvbm.manager import BlockManager
from kvbm.plans import LoadPlan, StorePlan


def arena_blocks(mgr: BlockManager) -> ArenaBlocks:
    return ArenaBlocks(mgr.geometry, mgr.host.arena.array, mgr.host.num_slots)


def offload(
    mgr: BlockManager, kv: EngineKV, block_ids: Sequence[int], keys: Sequence[BlockKey]
) -> int:
    """Write engine blocks through to G2 (block_ids[i] holds keys[i]). Returns blocks added."""

    def prepare(chunk: Sequence[BlockKey]) -> tuple[list[int], list[int], StorePlan]:
        plan = mgr.prepare_store(chunk)
        return plan.slots, plan.positions, plan

    def complete(plan: object, ok: bool) -> int:
        assert isinstance(plan, StorePlan)
        return mgr.complete_store(plan, success=ok)

    return store_in_steps(
        arena_blocks(mgr), kv, keys, block_ids, mgr.max_load_blocks, prepare, complete
    )


def onboard(
    mgr: BlockManager, kv: EngineKV, keys: Sequence[BlockKey], block_ids: Sequence[int]
) -> int:
    """Copy the longest locally held prefix of `keys` into engine blocks
    `block_ids` (one per key). Returns how many leading blocks were loaded."""

    def prepare(rest: Sequence[BlockKey]) -> tuple[list[int], LoadPlan, bool]:
        plan = mgr.prepare_load(rest)
        return plan.slots, plan, plan.more

    def complete(plan: object) -> None:
        assert isinstance(plan, LoadPlan)
        mgr.complete_load(plan)
        mgr.metrics.moved.labels("g2_to_g1").inc(plan.num_blocks * mgr.geometry.block_bytes)

    loaded, _ = load_in_steps(arena_blocks(mgr), kv, keys, block_ids, prepare, complete)
    return loaded
