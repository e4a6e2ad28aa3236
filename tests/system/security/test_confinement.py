"""Issue 14, findings 1 and 5, against real `kvbm node` processes.

1. A holder of a node's NIXL metadata (here: a holder of the fleet secret,
   which is how one gets it) widens the registered region in the blob to the
   whole address space and reads and writes outside the arena. UCX on one
   host checks bounds on the reader's side only, so the READ lands wherever
   the address points in the process the agent lives in. That process is the
   node's agent process: the attacker reads its bytes, never the node
   daemon's (the secret, found in the daemon's memory, is not what comes
   back, and is nowhere in the agent process), and a WRITE at the secret's
   address leaves the daemon's bytes as they were. On the code before
   confinement the same READ returned the secret.
2. Damaged NIXL metadata (the memory type of its registration list set to
   255) crashes NIXL where it is loaded (SIGSEGV). Before, a node loaded its
   clients' metadata in the daemon: one such `auth` killed it. A node now
   loads a peer's metadata only as the client of its pull, in its agent
   process: a peer (with the secret) answering with damaged metadata costs
   that process; the daemon lives, starts another, and serves its engine.
"""

from __future__ import annotations

import asyncio
import re
import struct

import numpy as np

from kvbm.connector.attach import Available, NodeAttachment
from tests.harness.lying_peer import liar
from tests.harness.node_daemon import loads_exactly, until
from tests.harness.peer_attacks import SECRET, agent_pid, raw_session, two_nodes, write_secret
from tests.harness.support import GEOMETRY, SPACE, Engine, keys
from transport.nixl_agent import NixlAgent

WIDE = 1 << 62


def regions(pid: int) -> list[tuple[int, int, str]]:
    """(start, end, name) of each readable mapping of a process."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            span, perms = fields[0], fields[1]
            name = fields[5] if len(fields) > 5 else ""
            if perms[0] == "r" and name not in ("[vvar]", "[vsyscall]", "[vvar_vclock]"):
                start, end = (int(x, 16) for x in span.split("-"))
                out.append((start, end, name))
    return out


def peek(pid: int, address: int, n: int) -> bytes | None:
    """`n` bytes of a process's memory at `address`; None where nothing is mapped."""
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            mem.seek(address)
            return mem.read(n)
    except OSError:
        return None


def find(pid: int, needle: bytes) -> int | None:
    """The address of `needle` in a process's anonymous and heap memory."""
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, end, name in regions(pid):
            if name.startswith("/") and not name.startswith("/dev/shm"):
                continue  # the program and libraries: no secret lives there
            if end - start > 1 << 30:
                continue
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except OSError:
                continue
            at = data.find(needle)
            if at >= 0:
                return start + at
    return None


def widened(metadata: bytes, base: int, size: int) -> bytes:
    """The metadata with its one registered region grown to [0, 2**62)."""
    b, n = struct.pack("<Q", base), struct.pack("<Q", size)
    assert metadata.count(b) == 1 and metadata.count(n) == 1
    return metadata.replace(b, struct.pack("<Q", 0)).replace(n, struct.pack("<Q", WIDE))


class Attacker:
    """A NIXL agent of the attacker's own, with READ and WRITE anywhere its
    loaded metadata says it may."""

    def __init__(self) -> None:
        self.memory = np.zeros(1 << 20, dtype=np.uint8)
        self.agent = NixlAgent("kvbm-attacker", self.memory.ctypes.data, self.memory.size)

    def read(self, peer, address: int, n: int) -> bytes | None:
        local = np.array([(self.memory.ctypes.data, n)], np.uint64)
        ok = self.agent.read(peer, local, np.array([(address, n)], np.uint64), 5)
        return bytes(self.memory[:n]) if ok else None

    def write(self, peer, address: int, data: bytes) -> None:
        self.memory[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        raw = self.agent._agent  # the wrapper only reads; an attacker writes too
        zero = np.zeros((1, 1), np.uint64)
        local = np.hstack([np.array([(self.memory.ctypes.data, len(data))], np.uint64), zero])
        remote = np.hstack([np.array([(address, len(data))], np.uint64), zero])
        try:
            handle = raw.initialize_xfer(
                "WRITE",
                raw.get_xfer_descs(local, "DRAM"),
                raw.get_xfer_descs(remote, "DRAM"),
                peer.name,
            )
            state = raw.transfer(handle)
            for _ in range(100_000):
                if state != "PROC":
                    break
                state = raw.check_xfer_state(handle)
        except Exception:
            pass  # refused or failed: either way, nothing was written

    def close(self) -> None:
        self.agent.close()


def test_a_metadata_holder_reaches_the_agent_process_not_the_node(etcd, daemons, tmp_path):
    with two_nodes(etcd, daemons, tmp_path, 8, "--host-cache-mb", "8") as n:
        node = n.a.proc.pid
        confined = agent_pid(node)
        assert confined is not None
        secret_at = find(node, SECRET)
        assert secret_at is not None  # the daemon holds the secret: the prize
        assert find(confined, SECRET) is None  # the agent process does not
        attacker = Attacker()
        try:

            async def attack() -> None:
                _, writer, _, reply = await raw_session(n.host, n.port)
                try:
                    wide = widened(reply["nixl"], reply["arena"], reply["arena_bytes"])
                    peer = attacker.agent.add_peer(wide)
                    # a READ outside the arena lands in the agent process: its
                    # program text comes back exactly as that process maps it
                    text = next(r for r in regions(confined) if re.search(r"python", r[2]))
                    got = await asyncio.to_thread(attacker.read, peer, text[0], 64)
                    assert got is not None and got == peek(confined, text[0], 64)
                    # the daemon's secret is not what that address holds there
                    got = await asyncio.to_thread(attacker.read, peer, secret_at, len(SECRET))
                    assert got != SECRET
                    assert got == peek(confined, secret_at, len(SECRET))  # None: unmapped
                    # a WRITE there does not reach the daemon either
                    await asyncio.to_thread(attacker.write, peer, secret_at, b"X" * len(SECRET))
                    assert peek(node, secret_at, len(SECRET)) == SECRET
                finally:
                    writer.close()

            asyncio.run(asyncio.wait_for(attack(), 60))
        finally:
            attacker.close()
        # the node serves on: engines, and a pull of A's prompt by B, bit-exact
        assert n.a.proc.poll() is None and n.eng_a.stats()["ready"]
        assert loads_exactly(n.eng_b, n.keys, "remote_host")


def test_damaged_metadata_costs_the_agent_process_not_the_node(etcd, daemons, tmp_path):
    secret = write_secret(tmp_path / "secret")
    with liar(etcd.endpoint, "127.0.0.2", secret, "metadata", 4):
        flags = ["--etcd", etcd.endpoint, "--secret-file", secret, "--namespace", SPACE.namespace]
        victim = daemons("victim", "127.0.0.3", *flags)
        engine = NodeAttachment(victim.socket, GEOMETRY, remote=["host"])
        try:
            first = agent_pid(victim.proc.pid, "pull")  # where peers' metadata is loaded
            assert first is not None
            wanted = keys(0, 4)
            until(lambda: engine.lookup(wanted) == Available(0, 4), 10, "the liar is not seen")
            got = Engine(4)
            loaded, _ = engine.load(got.kv, wanted, list(range(4)))
            assert loaded == 0  # recomputed: the pull died with the agent process

            def agent() -> dict | str:
                return engine.stats()["nixl_agent"]["pulling"]

            def restarted() -> bool:  # one read: the state may change between two
                state = agent()
                return isinstance(state, dict) and state["generation"] == 1

            until(restarted, 30, "no new one")
            assert agent()["pid"] == agent_pid(victim.proc.pid, "pull") != first
            assert victim.proc.poll() is None
            assert "the NIXL agent process ended" in victim.log()
            own = keys(100, 4)  # and the node serves its engine as before
            made = Engine(4)
            assert engine.store(made.kv, own, made.compute(own)) == 4
            assert loads_exactly(engine, own, "local_host")
        finally:
            engine.close()
