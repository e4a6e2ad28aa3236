"""The confined NIXL agents (transport/confined_agent.py) with real child
processes and the real NIXL/UCX: a READ between two of them lands bit-exact;
a child that dies is replaced, and what was loaded into it is known to be
gone; the children get none of kvbm's environment; close ends them. The
child peers reach maps the arena read-only: a WRITE to it lands nowhere."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest

from kvbm.config import child_environment
from kvbm.shm_arena import SharedArena
from tests.harness.node_daemon import until
from transport.confined_agent import ConfinedAgent
from transport.errors import TransportError

SIZE = 4 << 20
BLOCK = 256 << 10


@pytest.fixture
def pair(tmp_path, monkeypatch):
    """Two confined agents on two arenas; A's arena holds known bytes."""
    monkeypatch.setenv("KVBM_SECRET", "not-for-the-child-0123456789")
    arenas = [SharedArena.create(n, SIZE, directory=str(tmp_path)) for n in ("a", "b")]
    arenas[0].array[:] = np.frombuffer(np.random.default_rng(1).bytes(SIZE), np.uint8)
    agents = [
        ConfinedAgent(f"agent-{i}", x.reopen(), SIZE, env=child_environment())
        for i, x in enumerate(arenas)
    ]
    yield arenas, agents
    for agent in agents:
        agent.close()
    for arena in arenas:
        arena.close()


def rows(base: int, blocks: list[int]) -> np.ndarray:
    return np.array([(base + b * BLOCK, BLOCK) for b in blocks], np.uint64)


def pulling(agent: ConfinedAgent, generation: int) -> bool:
    """Whether the agent's pulling child of `generation` is up."""
    state = agent.state()["pulling"]
    return state != "restarting" and state["generation"] == generation


def test_a_read_between_two_agent_processes_is_bit_exact(pair):
    (arena_a, arena_b), (a, b) = pair
    peer = b.add_peer(a.metadata)
    assert peer.name == "agent-0" and b.knows(peer)
    assert b.read(peer, rows(b.local_arena[0], [0, 1, 2]), rows(a.arena[0], [5, 0, 9]), timeout=10)
    for slot, block in zip([0, 1, 2], [5, 0, 9], strict=True):
        got = arena_b.array[slot * BLOCK : (slot + 1) * BLOCK]
        assert np.array_equal(got, arena_a.array[block * BLOCK : (block + 1) * BLOCK])
    assert not arena_b.array[3 * BLOCK :].any()
    # the addresses are the children's: their own mappings of the arena, not ours
    assert a.arena == (a.arena[0], SIZE) and a.pid != os.getpid()
    assert a.local_arena == (a.local_arena[0], SIZE) and a.pulling_pid not in (a.pid, os.getpid())
    for pid in (a.pid, a.pulling_pid):
        with open(f"/proc/{pid}/environ", "rb") as f:
            assert b"KVBM_" not in f.read()


def test_a_dead_agent_process_is_replaced_and_its_peers_forgotten(pair):
    (_, _), (a, b) = pair
    peer = b.add_peer(a.metadata)
    local, remote = rows(b.local_arena[0], [0]), rows(a.arena[0], [1])
    assert b.read(peer, local, remote, timeout=10)
    old, serving = b.pulling_pid, b.pid
    os.kill(old, signal.SIGKILL)
    until(lambda: pulling(b, 1), 60, "B never came back")
    assert b.pulling_pid != old and b.state()["pulling"]["starts"] == 2
    assert b.pid == serving and b.generation == 0  # what peers reach lives on
    assert not b.knows(peer)
    assert not b.read(peer, local, remote, timeout=2)  # stale: refused, no hang
    b.remove_peer(peer)  # a no-op for a peer of a dead child
    again = b.add_peer(a.metadata)  # a peer reconnects: loaded into the new child
    assert again.generation == 1
    assert b.read(again, rows(b.local_arena[0], [0]), remote, timeout=10)


def serving_starts(agent) -> int:
    """How many serving children `agent` has started (0 while one is restarting)."""
    state = agent.state()["serving"]
    return 0 if state == "restarting" else state["starts"]


def arena_mapping(pid: int, arena: SharedArena) -> str:
    """The permissions of the process's one mapping of `arena`'s file."""
    inode = str(os.stat(SharedArena.path_of(arena.name, arena.directory)).st_ino)
    with open(f"/proc/{pid}/maps") as f:
        perms = [line.split()[1] for line in f if line.split()[4] == inode]
    assert len(perms) == 1, perms
    return perms[0]


@pytest.mark.parametrize("tls", [None, "tcp,self"], ids=["ucx-default-cma", "ucx-tcp"])
def test_the_serving_child_maps_the_arena_read_only_and_a_write_lands_nowhere(
    pair, monkeypatch, tls
):
    """A holder of the served metadata WRITEs over A's arena: under CMA the
    kernel refuses it (the mapping has no write right), under TCP the
    serving child faults and is replaced; A's bytes stay as they were and a
    peer reads them from the new child."""
    from tests.system.security.test_confinement import Attacker

    (arena_a, _), (a, b) = pair
    assert arena_mapping(a.pid, arena_a) == "r--s"  # shared, read-only
    assert arena_mapping(a.pulling_pid, arena_a) == "rw-s"
    before = arena_a.array.copy()
    if tls is not None:
        monkeypatch.setenv("UCX_TLS", tls)  # the attacker's own agent
    attacker = Attacker()
    base = a.arena[0]  # the address the attacker learned: after a fault there is none
    try:
        peer = attacker.agent.add_peer(a.metadata)
        attacker.write(peer, base, b"\x5a" * BLOCK)
        attacker.write(peer, base + 3 * BLOCK, b"\x5a" * BLOCK)
    finally:
        attacker.close()
    assert np.array_equal(arena_a.array, before)
    # Under TCP the faulted child is replaced: wait for its successor, not just
    # for "not restarting", which the dead child shows until A notices it died.
    starts = 1 if tls is None else 2
    until(lambda: serving_starts(a) == starts, 60, "A's serving child never came back")
    peer = b.add_peer(a.metadata)  # the one up now (replaced, where the WRITE faulted it)
    assert b.read(peer, rows(b.local_arena[0], [0]), rows(a.arena[0], [3]), timeout=10)


def test_a_serving_child_refuses_a_writable_descriptor(tmp_path):
    from transport.agent_child import _map

    arena = SharedArena.create("w", SIZE, directory=str(tmp_path))
    try:
        with pytest.raises(ValueError, match="read-only descriptor only"):
            _map(arena.reopen(), SIZE, "serve")
    finally:
        arena.close()


def test_damaged_metadata_ends_only_the_agent_process(pair):
    (_, _), (a, b) = pair
    metadata = a.metadata
    tag = b"nixlSDList|t"
    at = metadata.index(tag) + len(tag) + 8
    with pytest.raises(TransportError, match="NIXL agent process failed"):
        b.add_peer(metadata[:at] + b"\xff" + metadata[at + 1 :])  # NIXL crashes on it
    until(lambda: pulling(b, 1), 60, "B never came back")
    peer = b.add_peer(metadata)
    assert b.read(peer, rows(b.local_arena[0], [2]), rows(a.arena[0], [3]), timeout=10)


def test_close_ends_the_child(tmp_path):
    arena = SharedArena.create("c", SIZE, directory=str(tmp_path))
    agent = ConfinedAgent("agent-c", arena.reopen(), SIZE, env=child_environment())
    pids = agent.pid, agent.pulling_pid
    agent.close()
    agent.close()  # twice is fine
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)  # ended and reaped
    arena.close()


def test_a_failed_start_leaves_no_process_and_no_descriptor(tmp_path):
    """Both children start at once; when they cannot (no such NIXL backend),
    the error says so, both are gone and the arena's descriptor is closed."""
    arena = SharedArena.create("f", SIZE, directory=str(tmp_path))
    fd = arena.reopen()
    # this test's worker may still be reaping another test's process: only
    # children that were not there before the start count
    before = children()
    try:
        with pytest.raises(TransportError, match="did not start"):
            ConfinedAgent("agent-f", fd, SIZE, env=child_environment(), backend="NO-SUCH")
        with pytest.raises(OSError):
            os.fstat(fd)
        assert not children() - before
    finally:
        arena.close()


def children() -> set[str]:
    """This process's children, by pid (every thread's)."""
    kids = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            kids.update(f.read().split())
    return kids


def test_chunked_reads_land_in_order_and_every_queued_read_ends_first(pair):
    """`read_chunks` keeps two READs queued in the child while the caller
    handles the chunk that landed; when the caller stops (False) or fails
    (raises), the READs still queued are answered before it returns, so the
    channel stays in step and the next read works."""
    (arena_a, arena_b), (a, b) = pair
    peer = b.add_peer(a.metadata)
    chunks = [(rows(b.local_arena[0], [i]), rows(a.arena[0], [15 - i])) for i in range(6)]
    seen: list[int] = []

    def landed(i: int) -> bool:
        got = arena_b.array[i * BLOCK : (i + 1) * BLOCK]
        seen.append(i)
        return np.array_equal(got, arena_a.array[(15 - i) * BLOCK : (16 - i) * BLOCK])

    assert b.read_chunks(peer, chunks, 10, landed) == 6 and seen == list(range(6))
    assert b.read_chunks(peer, chunks, 10, lambda i: i < 1) == 2  # stopped after chunk 1

    def fails(i: int) -> bool:
        raise RuntimeError("the caller's own error")

    with pytest.raises(RuntimeError, match="the caller's own error"):
        b.read_chunks(peer, chunks, 10, fails)
    pid = b.pulling_pid
    assert b.read(peer, rows(b.local_arena[0], [7]), rows(a.arena[0], [3]), timeout=10)
    assert b.pulling_pid == pid  # the same child: its channel stayed in step


@pytest.mark.skipif(
    resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 1200, reason="needs 1,200 open files"
)
def test_an_agent_started_by_a_node_with_many_open_files_serves(tmp_path):
    # a node with many peers holds more than 1024 descriptors, so its agent's
    # channel can be numbered above what select() takes; in a child process,
    # whose limits and descriptors are its own
    script = f"""
import os, resource
import numpy as np
from kvbm.config import child_environment
from kvbm.shm_arena import SharedArena
from transport.confined_agent import ConfinedAgent
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
arenas = [SharedArena.create(n, {SIZE}, directory={str(tmp_path)!r}) for n in ("a", "b")]
arenas[0].array[:] = 7
a, b = (ConfinedAgent(f"agent-{{n}}", x.reopen(), {SIZE}, env=child_environment())
        for n, x in zip("ab", arenas))
try:
    peer = b.add_peer(a.metadata)
    rows = lambda base: np.array([(base, {BLOCK})], np.uint64)
    assert b.read(peer, rows(b.local_arena[0]), rows(a.arena[0]), timeout=10)
    assert (arenas[1].array[:{BLOCK}] == 7).all()
finally:
    a.close()
    b.close()
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
