"""The engine path and the network path share one manager: several threads
store, load, pin and seal at once (beside the node's background upkeep:
sealing, and writing to disk ahead of eviction), and every block they read
is the block that was stored under its key."""

from __future__ import annotations

import random
import threading
import time

import xxhash

from kvbm.connector.direct import offload, onboard
from tests.harness.support import Engine, keys

KEYS = keys(0, 40)


def test_engine_and_network_paths_at_once(make_manager):
    mgr = make_manager(host_slots=16, disk_slots=64, min_uses=1)
    errors: list[BaseException] = []
    stop = time.monotonic() + 3.0
    counts = {"loaded": 0, "sealed": 0, "sealed_in_background": 0, "written_ahead": 0}
    lock = threading.Lock()

    def engine(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while time.monotonic() < stop:
                start = rng.randrange(0, 36)
                ks = KEYS[start : start + rng.randint(1, 4)]
                eng = Engine(len(ks))
                if rng.random() < 0.5:
                    offload(mgr, eng.kv, eng.compute(ks), ks)
                else:
                    n = onboard(mgr, eng.kv, ks, list(range(len(ks))))
                    assert all(eng.holds(ks[i], i) for i in range(n)), "wrong bytes loaded"
                    with lock:
                        counts["loaded"] += n
        except BaseException as e:
            errors.append(e)

    def network(seed: int) -> None:
        # what a peer's pull does: pin a prefix, checksum it, read it, unpin
        rng = random.Random(seed)
        ref = Engine(1)
        try:
            while time.monotonic() < stop:
                start = rng.randrange(0, 36)
                plan = mgr.prepare_load(KEYS[start : start + rng.randint(1, 4)])
                try:
                    sums = mgr.checksum_plan(plan)
                    for key, slot, c in zip(plan.keys, plan.slots, sums, strict=True):
                        data = mgr.host.block_view(slot)
                        assert xxhash.xxh3_64_intdigest(data) == c
                        want = b"".join(t.numpy().tobytes() for t in ref.content(key))
                        assert bytes(data) == want, "pinned block changed under a reader"
                    with lock:
                        counts["sealed"] += len(sums)
                finally:
                    mgr.complete_load(plan)
        except BaseException as e:
            errors.append(e)

    def upkeep() -> None:
        # the node's background upkeep: sums blocks and writes the coldest to
        # disk, both without pinning them
        try:
            while time.monotonic() < stop:
                n = mgr.checksum_newest(2)
                w = mgr.write_ahead(4, 2)
                with lock:
                    counts["sealed_in_background"] += n
                    counts["written_ahead"] += w
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=engine, args=(i,)) for i in range(2)]
    threads += [threading.Thread(target=network, args=(10 + i,)) for i in range(2)]
    threads.append(threading.Thread(target=upkeep))
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors[0]
    # the run really exercised both paths
    assert all(counts.values()), counts
    host = mgr.host.table
    for slot in host.index.values():  # every checksum recorded is the block's
        assert host.checksums[slot] in (None, *mgr.host.checksums([slot]))
    mgr.host.table.check()
    mgr.disk.table.check()
    assert sum(mgr.host.table.pins) == 0 and sum(mgr.disk.table.pins) == 0
