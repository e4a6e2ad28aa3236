"""Issue 14, finding 7: what a local user, or another engine, can do to a
node. Against real processes: a FIFO planted under an arena's name in the
arena directory does not hang the node's first engine; a private-node
directory another user could write into is refused, not used; an engine
cannot settle the leases of another engine's connection by counting."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from kvbm.connector.attach import NodeAttachment
from kvbm.errors import NodeError
from kvbm.host_pool import ARENA_PREFIX
from tests.harness.node_daemon import Daemon
from tests.harness.support import GEOMETRY


def test_a_fifo_named_like_an_arena_does_not_hang_the_node(daemons, tmp_path):
    arenas = tmp_path / "arenas"
    arenas.mkdir()
    os.mkfifo(arenas / f"{ARENA_PREFIX}1-deadbeef")  # what another user could plant in /dev/shm
    (arenas / f"{ARENA_PREFIX}2-feedface").symlink_to(tmp_path / "elsewhere")
    node = daemons("node-a", "127.0.0.2", "--host-arena-dir", str(arenas))
    engine = NodeAttachment(node.socket, GEOMETRY, timeout=15)  # builds the tiers: sweeps
    try:
        assert engine.stats()["tiers"]["host"]["capacity"] > 0
        assert (arenas / f"{ARENA_PREFIX}1-deadbeef").exists()  # not ours: left alone
    finally:
        engine.close()


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o1777])  # writable by others
def test_a_private_node_directory_open_to_others_is_refused(tmp_path, mode):
    directory = tmp_path / f"kvbm-private-{os.getuid()}"
    directory.mkdir()
    directory.chmod(mode)
    # what another user planted there: a socket that answers
    planted = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    planted.bind(str(directory / "node.sock"))
    planted.listen()
    try:
        code = (
            "from kvbm.config import load_config; from kvbm.connector import private_node as p;"
            f"p.tempfile.gettempdir = lambda: {str(tmp_path)!r};"
            "print(p.ensure_private_node(load_config(env={}, overrides={'host_cache_mb': 2})))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert out.returncode != 0, "a planted socket was taken for the private node"
        assert "not a private directory of this user" in out.stderr
    finally:
        planted.close()


def test_an_engine_cannot_settle_another_engines_leases_by_counting(daemons):
    node = daemons("node-a", "127.0.0.2")
    holder = NodeAttachment(node.socket, GEOMETRY)
    other = NodeAttachment(node.socket, GEOMETRY)
    try:
        held = holder.link.call("reserve", {"keys": holder.keys([1, 2])})
        for guess in range(1, 200):
            with pytest.raises(NodeError, match="no lease"):
                other.link.call("commit", {"lease": guess, "ok": True})
        assert holder.stats()["engine_leases"] == 1
        # the lease's own id works, from any engine the id was handed to
        assert other.link.call("commit", {"lease": held["lease"], "ok": False}) == {"added": 0}
        assert holder.stats()["engine_leases"] == 0
    finally:
        holder.close()
        other.close()


# imports first: the interpreter's files may be out of the other user's reach
ENGINE_AS = """
import os, sys
from kvbm.connector.attach import NodeAttachment
from kvbm.errors import NodeError
from tests.harness.support import GEOMETRY
os.setgroups([]); os.setgid(int(sys.argv[3])); os.setuid(int(sys.argv[2]))
try:
    NodeAttachment(sys.argv[1], GEOMETRY, map_arena=False, timeout=10).stats()
    print("served")
except NodeError as e:
    print("refused", e)
"""


def engine_as(socket_path: str, uid: int, gid: int) -> str:
    """What an engine process of another user gets from the node."""
    out = subprocess.run(
        [sys.executable, "-c", ENGINE_AS, socket_path, str(uid), str(gid)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture
def open_node():
    """open_node(*flags) -> a node whose socket another user can reach: in a
    directory open to all, the socket itself chmod-ed 0666 (as a careless
    mount would leave it). Stopped, and its directory removed, after the test."""
    directory = tempfile.mkdtemp(prefix="kvbm-open-")
    os.chmod(directory, 0o755)
    started: list[Daemon] = []

    def start(*flags: str) -> Daemon:
        started.append(Daemon(directory, "node-a", "127.0.0.2", *flags))
        os.chmod(directory, 0o755)  # the node made it 0700: opened again
        os.chmod(started[-1].socket, 0o666)
        return started[-1]

    yield start
    for node in started:
        node.stop()
    shutil.rmtree(directory, ignore_errors=True)


def as_root() -> None:
    if os.getuid() != 0:
        pytest.fail("this test runs an engine as another user: run it as root (CI does)")


def test_an_engine_of_another_user_is_refused_even_through_an_open_socket(open_node):
    as_root()
    node = open_node()
    assert engine_as(node.socket, 0, 0).startswith("served")  # control: the node's own user
    assert engine_as(node.socket, 65534, 65534).startswith("refused")
    assert "neither this node's user nor in its shared_group" in node.log()


def test_a_member_of_the_shared_group_is_served(open_node):
    as_root()
    node = open_node("--shared-group", "65534")
    assert engine_as(node.socket, 65534, 65534).startswith("served")


VIEW_AS = """
import os, sys
from kvbm.connector.attach import NodeAttachment
from tests.harness.support import GEOMETRY
path = sys.argv[4]
os.setgroups([]); os.setgid(int(sys.argv[3])); os.setuid(int(sys.argv[2]))
try:
    engine = NodeAttachment(sys.argv[1], GEOMETRY, map_arena=False, timeout=10)
    print("reads" if engine.view is not None and engine.seen(engine.keys([1])) else "no view")
except Exception as e:
    print("refused", type(e).__name__)
for flags, what in ((os.O_RDWR, "writes"), (os.O_RDONLY, "opens")):
    try:
        os.close(os.open(path, flags))
        print(what)
    except PermissionError:
        print("cannot", what)
"""


def test_the_key_view_is_read_only_to_the_shared_group_and_closed_to_others(open_node):
    """The node's key view (kvbm/key_view.py) is what engines read to skip a
    round trip: the shared group may read it, never write it (a writer could
    make every engine of the node miss, or pin what is not there); a user
    outside the group cannot open it at all."""
    as_root()
    node = open_node("--shared-group", "65534")
    probe = NodeAttachment(node.socket, GEOMETRY)
    try:
        assert probe.view is not None
        path = os.path.join(probe.stats()["host_arena"]["dir"], probe.view.name)
    finally:
        probe.close()

    def view_as(uid: int, gid: int) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-c", VIEW_AS, node.socket, str(uid), str(gid), path],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.split("\n")[:3]

    assert view_as(65534, 65534) == ["reads", "cannot writes", "opens"]
    assert view_as(65533, 65533) == ["refused NodeError", "cannot writes", "cannot opens"]
