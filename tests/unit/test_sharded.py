"""The sharded index's protocol between nodes (discovery/sharded.py), with the
calls between nodes made in process: publish, owners, lookups, a ring that
changes, failed sends, restarts and dead nodes. The same protocol over real
peer connections is tested in tests/integration/test_sharded_nodes.py."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.owners import places
from discovery.records import LookupResult, PeerRun
from discovery.sharded import MAX_HOLDERS_ANSWERED, MOVE_GRACE_S, ShardedLocations
from discovery.tier import Tier

H, D = Tier.HOST, Tier.DISK
TAIL = b"\x01fingerprint"


def tier(node: ShardedLocations, k: bytes) -> Tier | None:
    return node.held[k][1] if k in node.held else None


def per_key(runs: list[tuple[int, dict[str, Tier]]]) -> list[dict[str, Tier]]:
    return [h for n, h in runs for _ in range(n)]


def keys(start: int, n: int) -> list[bytes]:
    return [
        (i * 0x9E3779B97F4A7C15 % 2**64).to_bytes(16, "little") + TAIL
        for i in range(start, start + n)
    ]


class Fleet:
    """Nodes wired in process; `down` nodes fail every call to them."""

    def __init__(self, names: list[str]) -> None:
        self.nodes: dict[str, ShardedLocations] = {}
        self.down: set[str] = set()
        self.leases: dict[str, int] = {}  # each node's record's lease, as etcd has it
        self.next_lease = 100
        self.asked: list[tuple[str, int]] = []  # every ask: (owner, how many keys)
        for n in names:
            self.add(n)
        self.members()

    def add(self, name: str) -> ShardedLocations:
        async def send(owner: str, session, xs, ts: list[Tier | None]) -> bool:
            if owner in self.down:
                return False
            return self.nodes[owner].place(name, session, xs, ts)

        async def ask(owner: str, xs) -> list | None:
            self.asked.append((owner, len(xs)))
            return None if owner in self.down else self.nodes[owner].holders(xs, name)

        node = self.nodes[name] = ShardedLocations(name, send, ask)
        self.new_lease(name)
        return node

    def new_lease(self, name: str) -> int:
        """`name` starts a session: a new lease on its record."""
        self.next_lease += 1
        self.leases[name] = self.next_lease
        self.nodes[name].new_session(self.next_lease)
        return self.next_lease

    def members(self) -> None:
        """Every live node sees every live node's record (and its lease)."""
        live = {n: lease for n, lease in self.leases.items() if n not in self.down}
        for n in live:
            if n in self.nodes:
                self.nodes[n].set_members(live)

    async def flush(self) -> None:
        await asyncio.gather(
            *(n.flush() for name, n in self.nodes.items() if name not in self.down)
        )

    def lookup(self, at: str, ks: list[bytes], anchors=None) -> LookupResult:
        return asyncio.run(self.nodes[at].lookup(ks, set(self.nodes) - self.down, anchors))


def total(fleet: Fleet) -> int:
    return sum(len(n.table) for n in fleet.nodes.values())


def test_a_prefix_held_by_two_peers_is_found_from_a_third_node_by_asking_owners():
    fleet = Fleet([f"n{i}" for i in range(6)])
    ks = keys(0, 40)
    fleet.nodes["n1"].publish(dict.fromkeys(ks[:25], H))
    fleet.nodes["n2"].publish({**dict.fromkeys(ks[:10], H), **dict.fromkeys(ks[10:40], D)})
    asyncio.run(fleet.flush())
    assert total(fleet) == 65  # each location once, at its owner
    assert max(len(n.table) for n in fleet.nodes.values()) < 65  # spread among owners
    # every block found, each said held where it is held, in its tier
    result = fleet.lookup("n0", ks)
    assert result.total == 40
    for run in result.runs:
        node = fleet.nodes[run.node_id]
        assert [tier(node, k) for k in ks[run.start : run.start + run.length]] == list(run.tiers)
    # a node asks for the keys after the prefix its own tiers hold
    assert fleet.lookup("n1", ks[25:]) == LookupResult(0, (PeerRun("n2", 0, 15, (D,) * 15),))
    fleet.nodes["n2"].publish(dict.fromkeys(ks[:10], None))  # n2 evicts its first blocks
    asyncio.run(fleet.flush())
    result = fleet.lookup("n0", ks)
    assert result.total == 40 and [r.node_id for r in result.runs] == ["n1", "n2"]
    for run in result.runs:  # every block said held is held there, in that tier
        node = fleet.nodes[run.node_id]
        assert [tier(node, k) for k in ks[run.start : run.start + run.length]] == list(run.tiers)


def test_a_joining_node_takes_its_shards_and_lookups_find_them_before_its_first_batch():
    fleet = Fleet([f"n{i}" for i in range(4)])
    now = [1000.0]
    for node in fleet.nodes.values():
        node.clock = lambda: now[0]
    ks = keys(100, 300)
    fleet.nodes["n0"].publish(dict.fromkeys(ks, H))
    asyncio.run(fleet.flush())
    fleet.add("n4").clock = lambda: now[0]
    fleet.members()
    whole = LookupResult(0, (PeerRun("n0", 0, 300, (H,) * 300),))
    # n4 owns its shards now but nobody has sent it their keys yet: the
    # old owners, which keep them for a grace period, answer for them
    assert len(fleet.nodes["n4"].table) == 0
    assert fleet.lookup("n3", ks) == whole and fleet.lookup("n4", ks) == whole
    asyncio.run(fleet.flush())
    moved = len(fleet.nodes["n4"].table)
    assert 0 < moved < 300 and total(fleet) == 300 + moved  # kept, and sent anew
    dumped = [x for n in fleet.nodes.values() for x in n.dump()]
    assert len(dumped) == len(set(dumped)) == 300  # each key in one owner's share
    now[0] += MOVE_GRACE_S
    for node in fleet.nodes.values():
        node.expire()
    assert total(fleet) == 300  # the old owners forgot the moved shards
    assert fleet.lookup("n3", ks) == whole and fleet.lookup("n4", ks) == whole


def test_a_shard_that_comes_back_within_the_grace_period_is_not_answered_from_stale_locations():
    fleet = Fleet([f"n{i}" for i in range(3)])
    ks = keys(200, 200)
    fleet.nodes["n0"].publish(dict.fromkeys(ks, H))
    asyncio.run(fleet.flush())
    fleet.add("n3")
    fleet.members()  # n3 joins: the old owners keep what moved to it
    fleet.nodes["n0"].publish(dict.fromkeys(ks[:50], None))  # evicted, told to the new owners
    asyncio.run(fleet.flush())
    fleet.down.add("n3")
    fleet.members()  # n3 leaves: its shards come back to their old owners
    asyncio.run(fleet.flush())
    assert fleet.lookup("n1", ks) == LookupResult(0)  # key 0 is gone, not said held
    found = fleet.lookup("n1", ks[50:])
    assert found == LookupResult(0, (PeerRun("n0", 0, 150, (H,) * 150),))
    assert total(fleet) - len(fleet.nodes["n3"].table) == 150


def test_an_owner_that_fails_gets_the_changes_later_and_a_dead_owners_keys_go_to_the_next():
    fleet = Fleet([f"n{i}" for i in range(4)])
    ks = keys(1000, 200)
    fleet.down.add("n3")
    fleet.nodes["n0"].publish(dict.fromkeys(ks, H))
    asyncio.run(fleet.flush())
    assert fleet.nodes["n0"].pending > 0  # n3's share waits
    fleet.down.clear()
    asyncio.run(fleet.flush())
    assert fleet.nodes["n0"].pending == 0 and total(fleet) == 200
    # n3 dies for good: the ring without it, its shards to the others
    fleet.down.add("n3")
    fleet.members()
    asyncio.run(fleet.flush())
    assert total(fleet) - len(fleet.nodes["n3"].table) == 200
    assert fleet.lookup("n1", ks) == LookupResult(0, (PeerRun("n0", 0, 200, (H,) * 200),))


def test_a_dead_holders_locations_go_with_its_record_and_a_restarted_ones_new_session_stays():
    fleet = Fleet([f"n{i}" for i in range(3)])
    ks = keys(5000, 100)
    fleet.nodes["n2"].publish(dict.fromkeys(ks, H))
    asyncio.run(fleet.flush())
    assert total(fleet) == 100
    # n2 restarts under a new lease; until the owners see its new record,
    # its batches are refused and wait
    old = fleet.leases["n2"]
    fleet.nodes["n2"].held.clear()
    fleet.new_lease("n2")
    fleet.nodes["n2"].publish(dict.fromkeys(ks[:30], D))
    asyncio.run(fleet.flush())
    assert fleet.nodes["n2"].pending > 0 and total(fleet) == 100
    fleet.members()  # the owners see the new record: the old session's locations go
    assert total(fleet) == 0
    asyncio.run(fleet.flush())
    assert total(fleet) == 30 and fleet.nodes["n2"].pending == 0
    # a batch from the old session, arriving late, is refused
    owner = fleet.nodes[fleet.nodes["n0"].ring.owners_of(places(ks[:1]))[0]]
    assert owner.place("n2", old, places(ks[:1]), [H]) is False
    # the record goes (the lease expired): everything of n2 goes
    fleet.down.add("n2")
    fleet.members()
    assert sum(len(n.table) for name, n in fleet.nodes.items() if name != "n2") == 0
    assert fleet.lookup("n0", ks) == LookupResult(0)


def test_owners_refuse_keys_past_their_cap_but_still_take_removals():
    fleet = Fleet(["n0"])
    node = fleet.nodes["n0"]
    node.publish(dict.fromkeys(keys(0, 40), H))
    asyncio.run(fleet.flush())
    fleet.leases["intruder"] = 7  # a fleet member (its own shards now) that floods n0
    fleet.members()
    before = len(node.table)
    node.max_locations = before + 3
    node.place("intruder", 7, places(keys(100, 20)), [H] * 20)
    assert len(node.table) == before and node.over_cap == 1
    node.publish(dict.fromkeys(keys(0, 5), D))  # at the cap, a tier change still applies
    node.publish(dict.fromkeys(keys(5, 5), None))  # and so does a removal
    asyncio.run(fleet.flush())
    owners = node.ring.owners_of(places(keys(0, 10)))
    assert len(node.table) == before - owners[5:].count("n0") and owners.count("n0")
    moved = [k for k, o in zip(keys(0, 5), owners, strict=False) if o == "n0"]
    assert per_key(node.holders(places(moved))) == [{"n0": D}] * len(moved)


@pytest.mark.parametrize("n", [1, 7])
def test_a_node_finds_its_own_keys_through_the_owners_and_knows_nothing_before_a_ring(n):
    fleet = Fleet([f"n{i}" for i in range(n)])
    ks = keys(9, 12)
    fleet.nodes["n0"].publish(dict.fromkeys(ks, H))
    asyncio.run(fleet.flush())
    assert fleet.lookup("n0", ks) == LookupResult(12)
    lonely = ShardedLocations("x")
    lonely.publish(dict.fromkeys(ks, H))  # held, but no ring yet: no owner to ask or tell
    asyncio.run(lonely.flush())
    assert lonely.pending == 0
    assert asyncio.run(lonely.lookup(ks, set())) == LookupResult(0)


def test_an_owner_takes_its_own_keys_of_a_batch_and_says_the_rest_were_not_taken():
    fleet = Fleet(["n0", "n1"])
    n0 = fleet.nodes["n0"]
    ks = keys(3000, 40)
    mine = [k for k, o in zip(ks, n0.ring.owners_of(places(ks)), strict=True) if o == "n0"]
    assert 0 < len(mine) < len(ks)
    assert n0.place("n1", fleet.leases["n1"], places(ks), [H] * len(ks)) is False
    assert len(n0.table) == len(mine)
    assert n0.place("n1", fleet.leases["n1"], places(mine), [D] * len(mine)) is True


@settings(max_examples=60, deadline=None)
@given(
    st.lists(  # per node: the range of the prompt it holds, and where its disk part ends
        st.tuples(st.integers(0, 70), st.integers(0, 70), st.integers(0, 70)), max_size=4
    ),
    st.integers(1, 70),
)
def test_lookups_of_runs_find_the_longest_prefix_and_name_only_blocks_held(ranges, n):
    fleet = Fleet([f"n{i}" for i in range(6)])
    ks = keys(90_000, n)
    for i, (a, b, d) in enumerate(ranges):
        a, b = min(a, b, n), min(max(a, b), n)
        fleet.nodes[f"n{i + 1}"].publish({ks[j]: D if j < d else H for j in range(a, b)})
    asyncio.run(fleet.flush())
    result = fleet.lookup("n0", ks)
    # the model: how far a chain of held ranges reaches from key 0
    reach = 0
    while True:
        spans = [(a, b) for a, b, _ in ranges if min(a, b, n) <= reach < min(max(a, b), n)]
        if not spans:
            break
        reach = max(min(max(a, b), n) for a, b in spans)
    assert result.total == reach
    for run in result.runs:
        node = fleet.nodes[run.node_id]
        assert [tier(node, k) for k in ks[run.start : run.start + run.length]] == list(run.tiers)


def test_an_owner_names_a_few_holders_of_a_key_host_first_the_same_for_one_asker():
    names = [f"n{i}" for i in range(20)]
    fleet = Fleet(names)
    pool = keys(40_000, 200)
    owners = fleet.nodes["n0"].ring.owners_of(places(pool))
    ks = [k for k, o in zip(pool, owners, strict=True) if o == owners[0]][:2]  # one owner's
    for i, name in enumerate(names):
        fleet.nodes[name].publish(dict.fromkeys(ks, D if i < 15 else H))
    asyncio.run(fleet.flush())
    owner = fleet.nodes[fleet.nodes["n0"].ring.owners_of(places(ks[:1]))[0]]
    first, second = per_key(owner.holders(places(ks), "asker-1"))
    assert len(first) == MAX_HOLDERS_ANSWERED
    assert [t for t in first.values()][:5] == [H] * 5  # the 5 in the host tier first
    assert set(first) == set(second)  # one asker: the same holders at every key
    others = [set(owner.holders(places(ks[:1]), f"asker-{i}")[0][1]) for i in range(2, 12)]
    assert any(o != set(first) for o in others)  # askers spread over the holders


def test_a_prompts_keys_sit_with_their_groups_owner_and_a_lookup_asks_each_owner_once():
    fleet = Fleet([f"n{i}" for i in range(16)])
    ks = keys(70_000, 128)
    heads = [int.from_bytes(k[:8], "little") for k in ks]
    anchors = [heads[i - i % 32] for i in range(128)]  # 4 groups of 32
    fleet.nodes["n1"].publish(dict.fromkeys(ks, H), dict(zip(ks, anchors, strict=True)))
    asyncio.run(fleet.flush())
    sizes = sorted(len(n.table) for n in fleet.nodes.values() if len(n.table))
    assert sum(sizes) == 128 and all(s % 32 == 0 for s in sizes)  # whole groups
    fleet.asked.clear()
    result = fleet.lookup("n0", ks, anchors)
    assert result == LookupResult(0, (PeerRun("n1", 0, 128, (H,) * 128),))
    owners = [o for o, _ in fleet.asked]
    assert len(owners) == len(set(owners)) <= 4  # one call per owner, a few owners
    assert sum(n for _, n in fleet.asked) <= 128
    # asked as each key its own, the keys are elsewhere: only a group's first
    # key, its own anchor, is where it was put
    assert fleet.lookup("n0", ks).total == 1


def test_kept_shards_expire_each_on_its_own_clock_and_a_node_that_left_is_not_asked():
    fleet = Fleet([f"n{i}" for i in range(4)])
    now = [0.0]

    def tick(t: float) -> None:
        now[0] = t
        for node in fleet.nodes.values():
            node.clock = lambda: now[0]
            node.expire()

    tick(0.0)
    ks = keys(300, 400)
    fleet.nodes["n0"].publish(dict.fromkeys(ks, H))
    asyncio.run(fleet.flush())
    rings = [fleet.nodes["n0"].ring]
    for t, name in ((1.0, "n4"), (1.0 + MOVE_GRACE_S * 0.8, "n5")):  # two joins, 0.8 grace apart
        tick(t)
        fleet.add(name).clock = lambda: now[0]
        fleet.members()
        asyncio.run(fleet.flush())
        rings.append(fleet.nodes["n0"].ring)

    def shards_held(node: ShardedLocations) -> set[int]:
        return {x >> 52 for x, _, _ in node.table.items()}

    def owned(ring, name: str) -> set[int]:
        return set(np.flatnonzero(ring.shards_of(name)).tolist())

    tick(1.0 + MOVE_GRACE_S * 1.1)  # the first join's grace is over, not the second's
    for name, node in fleet.nodes.items():
        lost_last = owned(rings[1], name) - owned(rings[2], name)
        assert shards_held(node) <= owned(rings[2], name) | lost_last, name
    assert any(owned(rings[1], n) - owned(rings[2], n) for n in fleet.nodes)
    tick(1.0 + MOVE_GRACE_S * 2)
    for name, node in fleet.nodes.items():
        assert shards_held(node) <= owned(rings[2], name), name
    assert total(fleet) == 400
    # a node leaves: its shards go back to nodes that never had them; nobody
    # asks the node that left (it would only time out, on a scheduling path)
    fleet.down.add("n5")
    fleet.members()
    fleet.asked.clear()
    fleet.lookup("n1", ks)
    assert "n5" not in {o for o, _ in fleet.asked}
