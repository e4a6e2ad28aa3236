"""Eight engine processes on one node, each running a mix of the connector's
calls that hypothesis chooses (lookups from the key view and from the node,
loads one by one and a step's worth at once, stores, pins left for the
node to settle when their engine disconnects), on a host tier small
enough that blocks are evicted under them: every block loaded is the one
stored under its key, bit for bit, and the node holds no lease at the end."""

from __future__ import annotations

import contextlib
import multiprocessing
from multiprocessing.connection import Connection

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvbm.connector.attach import NodeAttachment
from tests.harness.node_daemon import until
from tests.harness.support import GEOMETRY, Engine

ENGINES = 8
PROMPTS = 12  # shared by every engine: stores and loads meet on the same keys
BLOCKS = 8  # per prompt
OPS = ("lookup", "node_lookup", "load", "load_many", "store", "walk_away")


def _prompt(att: NodeAttachment, i: int) -> list:
    return att.keys([(i + 1) << 16 | j for j in range(BLOCKS)])


def _engine(sock: str, orders: Connection) -> None:
    """One engine process: runs each list of calls it is sent, answers with
    what it saw wrong (an empty list when all was right)."""
    att = NodeAttachment(sock, GEOMETRY)
    ids = list(range(BLOCKS))
    walked: list[NodeAttachment] = []
    while (plan := orders.recv()) is not None:
        wrong: list[str] = []
        loaded = 0
        for op, i in plan:
            ks = _prompt(att, i)
            if op == "store":
                made = Engine(BLOCKS)
                att.store(made.kv, ks, made.compute(ks))
            elif op in ("lookup", "node_lookup"):
                got = att.lookup(ks, ask_node=op == "node_lookup")
                if not 0 <= got.local <= BLOCKS or got.remote_host or got.remote_disk:
                    wrong.append(f"{op} {i}: {got}")
            elif op == "load":
                got_kv = Engine(BLOCKS)
                n, _ = att.load(got_kv.kv, ks, ids)
                loaded += n
                wrong += [f"load {i} block {b}" for b in range(n) if not got_kv.holds(ks[b], b)]
            elif op == "load_many":
                step = [_prompt(att, (i + d) % PROMPTS) for d in range(3)]
                for keys, pinned in zip(step, att.prepare_loads(step), strict=True):
                    got_kv = Engine(BLOCKS)
                    att.copy_in(got_kv.kv, pinned.slots, ids[: len(pinned.slots)])
                    att.complete_load(pinned.lease)
                    loaded += len(pinned.slots)
                    bad = [b for b in range(len(pinned.slots)) if not got_kv.holds(keys[b], b)]
                    wrong += [f"load_many block {b}" for b in bad]
            else:  # walk_away: pins taken on another connection, which then closes
                other = NodeAttachment(sock, GEOMETRY, map_arena=False)
                other.prepare_load(ks)
                walked.append(other)
        for other in walked:
            other.close()  # the node settles what they held
        walked.clear()
        orders.send((wrong, loaded))
    att.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """One node (1 MiB of host tier: 64 blocks for 96 prompt blocks) and
    eight engine processes, alive across the hypothesis examples."""
    from tests.harness.node_daemon import Daemon

    node = Daemon(tmp_path_factory.mktemp("mix"), "mix", "127.0.0.2", "--host-cache-mb", "1")
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    try:
        for _ in range(ENGINES):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_engine, args=(node.socket, child), daemon=True)
            proc.start()
            pipes.append(parent)
            procs.append(proc)
        probe = NodeAttachment(node.socket, GEOMETRY)
        loaded = [0]
        yield pipes, probe, loaded
        probe.close()
        assert loaded[0] > 0, "no example loaded a block: the bit-exact checks checked nothing"
    finally:
        for pipe in pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for proc in procs:
            proc.join(20)
            if proc.is_alive():
                proc.kill()
        node.stop()


ops = st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, PROMPTS - 1)), max_size=25)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(plans=st.lists(ops, min_size=ENGINES, max_size=ENGINES))
def test_eight_engines_under_any_mix_load_exactly_and_leave_no_lease(fleet, plans):
    pipes, probe, loaded = fleet
    for pipe, plan in zip(pipes, plans, strict=True):
        pipe.send(plan)
    answers = [pipe.recv() for pipe in pipes]
    assert [w for wrong, _ in answers for w in wrong] == []
    loaded[0] += sum(n for _, n in answers)
    # every engine still connected: the leases left are the walked-away
    # connections', which the node settles as it sees them close
    until(lambda: probe.stats()["engine_leases"] == 0, 10, "a lease was never settled")
