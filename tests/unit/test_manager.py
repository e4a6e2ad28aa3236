"""The block manager's moves between G1, G2 and G3, as narrated scenarios."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
import xxhash

from discovery.tier import Tier
from kvbm.block_key import KeySpace
from kvbm.connector.direct import offload, onboard
from kvbm.layout import ModelGeometry
from tests.harness.support import GEOMETRY, Engine, keys, store


def expect_tiers(mgr, ks, *tiers: Tier) -> None:
    assert mgr.lookup(ks).tiers == tiers


def expect_loaded(mgr, ks, n: int | None = None) -> Engine:
    """Onboard `ks` into a fresh engine; expect `n` (default all) bit-exact blocks."""
    eng = Engine(len(ks))
    eng.fill(-1.0)
    want = len(ks) if n is None else n
    assert onboard(mgr, eng.kv, ks, list(range(len(ks)))) == want
    for i in range(want):
        assert eng.holds(ks[i], i), f"block {i} differs after reload"
    for i in range(want, len(ks)):
        assert all(bool((layer[i] == -1.0).all()) for layer in eng.layers), "engine block touched"
    return eng


def metric(mgr, name: str, **labels: str) -> float:
    return mgr.metrics.value(name, **labels)


def test_store_then_load_from_host(make_manager):
    mgr = make_manager(host_slots=16)
    ks = keys(0, 8)
    # store [0..7] -> all in G2
    assert store(mgr, ks) == 8
    expect_tiers(mgr, ks, *[Tier.HOST] * 8)
    expect_loaded(mgr, ks)
    assert metric(mgr, "kvbm_tier_hits_total", tier="host") == 8
    assert metric(mgr, "kvbm_tier_blocks", tier="host") == 8
    assert metric(mgr, "kvbm_tier_bytes", tier="host") == 8 * GEOMETRY.block_bytes
    mgr.host.table.check()


def test_storing_twice_adds_nothing(make_manager):
    mgr = make_manager(host_slots=16)
    ks = keys(0, 4)
    assert store(mgr, ks) == 4
    # same keys again, and a batch repeating a key -> only new keys take slots
    assert store(mgr, ks) == 0
    assert store(mgr, [*keys(10, 1), *keys(10, 1)]) == 1
    assert mgr.host.table.registered_count == 5


def test_lookup_is_the_longest_prefix(make_manager):
    mgr = make_manager(host_slots=16)
    ks = keys(0, 6)
    store(mgr, ks[:3] + ks[4:])
    # [0 1 2 _ 4 5] -> prefix of 3; loading stops there and leaves the rest alone
    expect_tiers(mgr, ks, Tier.HOST, Tier.HOST, Tier.HOST)
    expect_loaded(mgr, ks, n=3)
    assert mgr.lookup(keys(100, 2)).num_blocks == 0


def test_lru_eviction_drains_to_disk(make_manager):
    mgr = make_manager(host_slots=4, disk_slots=16, min_uses=1)
    old, new = keys(0, 2), keys(10, 2)
    store(mgr, old)
    store(mgr, new)
    # touch old -> new is now least recently used
    expect_loaded(mgr, old)
    # store [20..21] -> G2 full, evicts new (LRU) to G3, keeps old
    store(mgr, keys(20, 2))
    expect_tiers(mgr, old, Tier.HOST, Tier.HOST)
    expect_tiers(mgr, new, Tier.DISK, Tier.DISK)
    assert metric(mgr, "kvbm_tier_evictions_total", tier="host") == 2
    assert metric(mgr, "kvbm_transfer_bytes_total", path="g2_to_g3") == 2 * GEOMETRY.block_bytes
    # load new -> staged G3 -> G2 -> G1, bit-exact
    expect_loaded(mgr, new)
    assert metric(mgr, "kvbm_tier_hits_total", tier="disk") == 2
    mgr.host.table.check()
    mgr.disk.table.check()


def test_disk_admission_needs_repeated_use(make_manager):
    mgr = make_manager(host_slots=4, disk_slots=16, min_uses=2)
    once, twice = keys(0, 2), keys(10, 2)
    store(mgr, twice)
    expect_loaded(mgr, twice)  # second use
    store(mgr, once)
    # store 4 more -> G2 evicts all four: `twice` earned a disk slot, `once` did not
    store(mgr, keys(20, 4))
    expect_tiers(mgr, twice, Tier.DISK, Tier.DISK)
    assert mgr.lookup(once).num_blocks == 0
    assert metric(mgr, "kvbm_tier_admissions_rejected_total", tier="disk", reason="frequency") == 2


def test_pinned_blocks_are_never_evicted(make_manager):
    mgr = make_manager(host_slots=4, disk_slots=16)
    held = keys(0, 2)
    store(mgr, held)
    plan = mgr.prepare_load(held)
    assert plan.num_blocks == 2
    # a flood of stores while `held` is pinned -> `held` stays in G2
    for start in range(10, 50, 2):
        store(mgr, keys(start, 2))
        expect_tiers(mgr, held, Tier.HOST, Tier.HOST)
    mgr.complete_load(plan)
    # unpinned -> evictable again
    store(mgr, keys(100, 4))
    assert mgr.lookup(held).tiers != (Tier.HOST, Tier.HOST)
    mgr.host.table.check()


def test_full_host_of_pinned_blocks_rejects_without_error(make_manager):
    mgr = make_manager(host_slots=4)
    held = keys(0, 4)
    store(mgr, held)
    # a load pins at most half of G2, so two readers pin all four
    plans = [mgr.prepare_load(held[:2]), mgr.prepare_load(held[2:])]
    assert [p.num_blocks for p in plans] == [2, 2]
    # nothing can be evicted -> the store is refused and counted, not raised
    assert store(mgr, keys(10, 2)) == 0
    assert metric(mgr, "kvbm_tier_admissions_rejected_total", tier="host", reason="full") == 2
    for p in plans:
        mgr.complete_load(p)
    assert store(mgr, keys(10, 2)) == 2


def test_failed_store_frees_its_slots(make_manager):
    mgr = make_manager(host_slots=4)
    plan = mgr.prepare_store(keys(0, 3))
    assert mgr.host.table.free_count == 1
    assert mgr.complete_store(plan, success=False) == 0
    assert mgr.host.table.free_count == 4
    assert mgr.lookup(keys(0, 3)).num_blocks == 0
    with pytest.raises(ValueError):
        mgr.complete_store(plan)


def test_batch_larger_than_host_cascades_to_disk(make_manager):
    mgr = make_manager(host_slots=8, disk_slots=64, min_uses=1)
    ks = keys(0, 20)
    # 20 blocks through an 8-slot G2 -> stored in chunks, earlier chunks drained to G3
    assert store(mgr, ks) == 20
    assert mgr.lookup(ks).num_blocks == 20
    expect_loaded(mgr, ks)


def test_checksum_is_taken_when_a_block_first_leaves_host(make_manager):
    mgr = make_manager(host_slots=8)
    ks = keys(0, 3)
    store(mgr, ks)
    slots = [mgr.host.table.get(k) for k in ks]
    assert all(mgr.host.table.checksums[s] is None for s in slots)
    plan = mgr.prepare_load(ks)
    sums = mgr.checksum_plan(plan)
    assert sums == [xxhash.xxh3_64_intdigest(mgr.host.block_view(s)) for s in plan.slots]
    assert [mgr.host.table.checksums[s] for s in slots] == sums
    assert mgr.checksum_plan(plan) == sums
    mgr.complete_load(plan)


def test_background_sealing_takes_the_newest_first_and_keeps_lru_order(make_manager):
    mgr = make_manager(host_slots=8, disk_slots=16, min_uses=1)
    ks = keys(0, 6)
    store(mgr, ks)
    table = mgr.host.table
    order = table.policy.order()
    assert mgr.checksum_newest(2) == 2
    slots = [table.get(k) for k in ks]
    sums = [table.checksums[s] for s in slots]
    assert sums[:4] == [None] * 4  # the two newest first
    assert sums[4:] == [xxhash.xxh3_64_intdigest(mgr.host.block_view(s)) for s in slots[4:]]
    assert table.policy.order() == order  # summing is not a use
    assert mgr.checksum_newest(100) == 4 and mgr.checksum_newest(100) == 0
    # a drain to disk and a peer's pin take the recorded checksums
    plan = mgr.prepare_load(ks)
    assert mgr.checksum_plan(plan) == [table.checksums[s] for s in plan.slots]
    mgr.complete_load(plan)
    store(mgr, keys(100, 8))
    expect_tiers(mgr, ks, *[Tier.DISK] * 6)
    expect_loaded(mgr, ks)
    table.check()


def test_a_ready_pin_stops_where_io_or_a_checksum_would_be_needed(make_manager):
    """What a peer server pins on its event loop: sealed G2 blocks only."""
    mgr = make_manager(host_slots=4, disk_slots=16, min_uses=1)
    ks = keys(0, 6)
    store(mgr, ks)  # k0, k1 drain to disk
    table = mgr.host.table
    assert mgr.prepare_peer_read(ks, ready_only=True) == []  # k0 is on disk only
    assert mgr.prepare_peer_read(ks[2:], ready_only=True) == []  # k2 is not sealed
    assert mgr.checksum_newest(2) == 2  # k4, k5
    assert mgr.prepare_peer_read(ks[2:], ready_only=True) == []
    hits = metric(mgr, "kvbm_tier_hits_total", tier="host")
    got = mgr.prepare_peer_read(ks[4:], ready_only=True)
    assert [k for k, _, _ in got] == ks[4:]
    assert metric(mgr, "kvbm_tier_hits_total", tier="host") == hits + 2  # counted once
    assert [c for _, _, c in got] == [table.checksums[s] for _, s, _ in got]
    # only the returned blocks stay pinned: the caller's to release
    assert sorted(s for s, n in enumerate(table.pins) if n) == sorted(s for _, s, _ in got)
    mgr.complete_peer_read([s for _, s, _ in got])
    # the full pin stages and sums what the ready one stopped at
    full = mgr.prepare_peer_read(ks)
    assert full and [k for k, _, _ in full] == ks[: len(full)]  # k0 staged from disk
    view = mgr.host.block_view
    assert [c for _, _, c in full] == [xxhash.xxh3_64_intdigest(view(s)) for _, s, _ in full]
    mgr.complete_peer_read([s for _, s, _ in full])
    assert not any(table.pins)
    table.check()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_g1_g2_g3_g2_g1_is_bit_exact(make_manager, dtype):
    g = ModelGeometry(num_layers=3, num_kv_heads=2, head_dim=32, block_size=32, dtype=dtype)
    mgr = make_manager(host_slots=4, disk_slots=16, geometry=g)
    space = KeySpace("rt", g.fingerprint)
    ks, filler = space.keys([0, 1, 2, 3]), space.keys([100, 101, 102, 103])
    src = Engine(4, g)
    src.compute(ks)
    # special values survive: NaN, infinity, negative zero, a subnormal
    src.layers[0][0].view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -0.0, -1e-40])
    assert offload(mgr, src.kv, [0, 1, 2, 3], ks) == 4
    # four more blocks push all of `ks` out to G3 ...
    assert offload(mgr, src.kv, [0, 1, 2, 3], filler) == 4
    assert mgr.lookup(ks).tiers == (Tier.DISK,) * 4
    # ... and back through G2 into a fresh engine, byte for byte
    dst = Engine(4, g)
    assert onboard(mgr, dst.kv, ks, [0, 1, 2, 3]) == 4
    for a, b in zip(src.layers, dst.layers, strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_admission_counts_each_rank_and_namespace_apart(make_manager):
    mgr = make_manager(host_slots=4, disk_slots=16, min_uses=2)
    rank0 = keys(0, 2)
    rank1 = KeySpace("test", GEOMETRY.fingerprint, rank=1).keys([0, 1])
    # the same sequence hashes under two tp ranks: each key is used once
    store(mgr, rank0)
    store(mgr, rank1)
    store(mgr, keys(20, 4))
    assert mgr.lookup(rank0).num_blocks == 0
    assert mgr.lookup(rank1).num_blocks == 0


def test_seal_refuses_a_finished_plan(make_manager):
    mgr = make_manager(host_slots=4)
    store(mgr, keys(0, 2))
    plan = mgr.prepare_load(keys(0, 2))
    mgr.complete_load(plan)
    mgr.complete_load(plan)  # twice is fine
    with pytest.raises(ValueError, match="already finished"):
        mgr.checksum_plan(plan)


def test_changes_report_where_each_touched_key_is_now(make_manager):
    """What the node publishes to the index: stores, drains to disk, drops."""
    mgr = make_manager(host_slots=4, disk_slots=8)
    store(mgr, keys(0, 2))
    assert mgr.take_changes() == {}  # nothing recorded before tracking starts
    mgr.track_changes()
    first = keys(10, 4)
    store(mgr, first)
    assert mgr.take_changes() == dict.fromkeys(first, Tier.HOST) | dict.fromkeys(
        keys(0, 2), Tier.DISK
    )
    assert mgr.take_changes() == {}  # taken once
    store(mgr, keys(20, 2))  # pushes first[:2] out to disk
    changes = mgr.take_changes()
    assert changes == dict.fromkeys(keys(20, 2), Tier.HOST) | dict.fromkeys(first[:2], Tier.DISK)
    with mgr._lock:
        mgr.disk.table.drop(first[0])
    assert mgr.take_changes() == {first[0]: None}
    held = mgr.held()
    assert held == dict.fromkeys(keys(20, 2) + first[2:], Tier.HOST) | dict.fromkeys(
        keys(0, 2) + first[1:2], Tier.DISK
    )


def test_write_ahead_follows_evictions_and_spares_the_eviction_its_write(make_manager):
    mgr = make_manager(host_slots=8, disk_slots=32, min_uses=1)
    table, disk = mgr.host.table, mgr.disk.table
    store(mgr, keys(0, 8))
    assert mgr.write_ahead(reach=4, limit=16) == 0  # full, but nothing evicted: no writes
    store(mgr, keys(100, 2))  # evicts keys 0, 1 (written at eviction): two owed
    assert disk.registered_count == 2
    order = table.policy.order()
    assert mgr.write_ahead(reach=4, limit=16) == 2  # the two coldest: keys 2, 3
    assert mgr.write_ahead(reach=4, limit=16) == 0  # owed nothing more
    assert set(disk.index) == {*keys(0, 4)}
    assert table.policy.order() == order  # still in G2, where they were
    expect_tiers(mgr, keys(2, 2), Tier.HOST, Tier.HOST)
    written = metric(mgr, "kvbm_transfer_bytes_total", path="g2_to_g3")
    assert written == 4 * GEOMETRY.block_bytes
    store(mgr, keys(200, 2))  # evicts keys 2, 3: already on disk, no second write
    assert metric(mgr, "kvbm_transfer_bytes_total", path="g2_to_g3") == written
    expect_tiers(mgr, keys(0, 4), *[Tier.DISK] * 4)
    expect_loaded(mgr, keys(0, 4))  # bit-exact from the copies written ahead
    table.check()
    disk.check()


def test_a_block_replaced_while_written_ahead_is_not_kept_on_disk(make_manager):
    """The write reads the block without a pin: if its slot is evicted and
    refilled meanwhile, the copy (whose checksum was taken from whatever the
    write read) must not count, or a load would get another block's bytes."""
    mgr = make_manager(host_slots=4, disk_slots=32, min_uses=1)
    store(mgr, keys(0, 4))
    store(mgr, keys(10, 1))  # evicts key 0: one owed; key 1 is now the coldest, unsummed
    victim = keys(1, 1)[0]
    slot = mgr.host.table.get(victim)
    assert mgr.host.table.checksums[slot] is None
    write = mgr.disk.write

    def racing_write(items, host):
        # meanwhile an engine stores new blocks: key 1 is evicted (not admitted
        # at eviction, so nothing else writes it) and its slot refilled
        mgr.admission.min_count = 99
        store(mgr, keys(20, 1))
        mgr.admission.min_count = 1
        assert mgr.host.table.keys[slot] == keys(20, 1)[0]
        return write(items, host)

    mgr.disk.write = racing_write
    assert mgr.write_ahead(reach=2, limit=16) == 0
    mgr.disk.write = write
    assert victim not in mgr.disk.table.index
    assert mgr.lookup([victim]).num_blocks == 0
    mgr.host.table.check()
    mgr.disk.table.check()


# A slot table's own arrays and records: its owner reads them through the
# table's methods (and its read-only `held`), so their shape stays the table's.
TABLE_INSIDES = {"keys", "serial", "checksums", "anchors", "state", "policy", "pins"}
TABLE_INSIDES |= {"unsummed", "index", "changed", "_changed"}


TABLES = {"host", "disk", "dt", "table"}  # what the manager names a slot table


def table_reads(path: pathlib.Path) -> list[str]:
    """Reads of a table's insides (`x.table.<inside>`, or `host.<inside>` and the
    like), method calls left out (`.index(...)` of a list is one)."""
    tree = ast.parse(path.read_text())
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    out = []
    for n in ast.walk(tree):
        if not isinstance(n, ast.Attribute) or n.attr not in TABLE_INSIDES or id(n) in called:
            continue
        of = n.value
        if (isinstance(of, ast.Attribute) and of.attr == "table") or (
            isinstance(of, ast.Name) and of.id in TABLES
        ):
            out.append(f"{path.name}:{n.lineno} .{n.attr}")
    return out


def test_the_manager_reads_its_tables_through_their_methods():
    root = pathlib.Path(__file__).resolve().parents[2] / "kvbm"
    for name in ("manager.py", "tier_moves.py"):
        assert table_reads(root / name) == [], name
    # the check sees a read where there is one (the tests read the insides freely)
    assert table_reads(pathlib.Path(__file__).resolve().parent / "test_manager.py")
