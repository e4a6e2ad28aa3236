"""Issue 31, findings 1, 3 and 7, against real node processes run the way a
user runs them: no shared development secret answers on any port of the
default node, the private node or a fleet started like the demo's; a socket
directory another user made first, and a node of another user, are refused;
a float where the wire wants an int is a clear error, not a traceback."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from kvbm.connector.attach import NodeAttachment
from kvbm.engine_wire import node_listening
from kvbm.errors import KvbmError, NodeError
from kvbm.node_process import fleet_secret
from tests.harness.node_daemon import Daemon, fleet_env, until
from tests.harness.port_scan import listening_ports, reachable
from tests.harness.second_user import NOBODY, as_nobody, need_root
from tests.harness.support import GEOMETRY

OLD_DEV_SECRET = b"kvbm-dev-secret-never-deploy-this"  # what nodes once fell back to


# imports first: the interpreter's files may be out of the other user's reach
KNOCK_AS = """
import asyncio, json, os, sys
from tests.harness.peer_attacks import answer, hello
if os.getuid() == 0:
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
secret, answered = bytes.fromhex(sys.argv[1]), []
for host, port in json.loads(sys.argv[2]):
    try:
        got = asyncio.run(answer(host, port, hello(secret=secret), timeout=3))
    except (OSError, TimeoutError):
        continue
    if len(got) > 4:
        answered.append([host, port])
print(json.dumps(answered))
"""


def handshakes(pid: int, secret: bytes) -> list[tuple[str, int]]:
    """The listening ports of `pid` (and its children) that answer a hello
    signed with `secret`, knocked at by another local user (uid 65534 where
    the test runs as root): a node answers only a hello it can verify."""
    ports = [(reachable(a), p) for a, p in listening_ports(pid)]
    out = subprocess.run(
        [sys.executable, "-c", KNOCK_AS, secret.hex(), json.dumps(ports)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return [(h, p) for h, p in json.loads(out.stdout)]


def test_a_default_node_opens_no_port_and_keeps_a_secret_of_its_own(daemons, tmp_path):
    """`kvbm node` as configured out of the box: no etcd, no secret."""
    node = daemons("node-a", "127.0.0.1")
    engine = NodeAttachment(node.socket, GEOMETRY)  # the tiers are built: all it would open
    try:
        assert engine.stats()["peer_address"].endswith(":0")  # no peer port
        assert listening_ports(node.proc.pid) == []
        assert handshakes(node.proc.pid, OLD_DEV_SECRET) == []
        own = tmp_path / "node-a.secret"
        assert own.stat().st_mode & 0o077 == 0 and own.read_bytes().strip() != OLD_DEV_SECRET
    finally:
        engine.close()


def test_the_private_node_opens_no_port(tmp_path):
    """What every zero-config vLLM engine starts (kvbm/connector/private_node.py)."""
    code = (
        "import sys, time; from kvbm.config import load_config;"
        "from kvbm.connector import private_node as p;"
        f"p.tempfile.gettempdir = lambda: {str(tmp_path)!r};"
        "path, proc = p.ensure_private_node(load_config(env={}, overrides={'host_cache_mb': 4}));"
        "from kvbm.connector.attach import NodeAttachment;"
        "from tests.harness.support import GEOMETRY;"
        "e = NodeAttachment(path, GEOMETRY); print(proc.pid, flush=True); sys.stdin.read()"
    )
    env = {k: v for k, v in os.environ.items() if k != "KVBM_SECRET"}
    starter = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    try:
        assert starter.stdout is not None
        node_pid = int(starter.stdout.readline())
        assert listening_ports(node_pid) == []
        assert handshakes(node_pid, OLD_DEV_SECRET) == []
    finally:
        starter.kill()  # the private node dies with it (PDEATHSIG)
        starter.wait(30)


def test_a_fleet_like_the_demos_answers_only_its_own_secret(etcd, daemons, tmp_path):
    """The demo's nodes: on etcd, with the secret the demo makes (fleet_secret)."""
    flags = fleet_secret(str(tmp_path))
    node = daemons("node-a", "127.0.0.2", "--etcd", etcd.endpoint, *flags)
    engine = NodeAttachment(node.socket, GEOMETRY)
    try:
        assert listening_ports(node.proc.pid)  # the peer port (and UCX's) are open
        assert handshakes(node.proc.pid, OLD_DEV_SECRET) == []
        # control: the fleet's own secret is answered on the peer port
        with open(flags[1], "rb") as f:
            fleet = f.read().strip()
        _, port = engine.stats()["peer_address"].rsplit(":", 1)
        assert ("127.0.0.2", int(port)) in handshakes(node.proc.pid, fleet)
    finally:
        engine.close()


def test_a_fleet_node_without_the_operators_secret_does_not_start(etcd, tmp_path):
    cmd = [sys.executable, "-m", "kvbm.cli", "node", "--etcd", etcd.endpoint]
    cmd += ["--socket", str(tmp_path / "n.sock"), "--listen", "127.0.0.2:0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=fleet_env([]))
    assert out.returncode == 2
    assert "needs the operator's secret" in out.stderr


# -- finding 3: the socket's directory, and the node at its other end ----------


def test_a_socket_directory_another_user_made_first_is_refused(shared_tmp, tmp_path):
    """Another user makes the node's socket directory before it starts (the
    default /tmp/kvbm/): the node refuses it instead of serving from a
    directory where that user can swap the socket, or link its name to the
    node's secret file for a chmod to follow."""
    need_root()
    squatted = os.path.join(shared_tmp, "kvbm")
    as_nobody(f"os.mkdir({squatted!r}, 0o777)")
    with pytest.raises(KvbmError, match="not a private directory of this user"):
        Daemon(tmp_path, "node-a", "127.0.0.1", "--socket", os.path.join(squatted, "node.sock"))
    assert os.listdir(squatted) == []  # neither a socket nor a secret went there


# imports first: the interpreter's files may be out of the other user's reach
NODE_AS_NOBODY = """
import os, sys
import kvbm.cli, kvbm.node.daemon, kvbm.node.engine_server, kvbm.manager
os.setgroups([]); os.setgid(65534); os.setuid(65534)
sys.exit(kvbm.cli.main(["node", *sys.argv[1:]]))
"""


def test_an_engine_refuses_a_node_of_another_user(shared_tmp):
    """Whoever serves the socket path (a squatter's fake node) must run as the
    node's user: the engine checks SO_PEERCRED before it says a word, and
    would otherwise store its KV into that user's arena and load its bytes."""
    need_root()
    directory = os.path.join(shared_tmp, "theirs")
    as_nobody(f"os.mkdir({directory!r}, 0o755)")
    socket_path = os.path.join(directory, "node.sock")
    fake = subprocess.Popen(
        [sys.executable, "-c", NODE_AS_NOBODY, "--socket", socket_path, "--host-cache-mb", "4"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=fleet_env([]),
        cwd=shared_tmp,
    )
    try:
        until(lambda: node_listening(socket_path) or fake.poll() is not None, 60, "no fake node")
        assert fake.poll() is None, fake.stderr.read() if fake.stderr else ""
        with pytest.raises(NodeError, match=f"runs as uid {NOBODY}"):
            NodeAttachment(socket_path, GEOMETRY, timeout=10)
        # control: an engine told that the node runs as that user attaches
        engine = NodeAttachment(socket_path, GEOMETRY, timeout=10, node_uid=NOBODY)
        engine.close()
    finally:
        fake.terminate()
        fake.wait(30)


# -- finding 7: wire values are checked by type ---------------------------------


@pytest.fixture(scope="module")
def wire_node(tmp_path_factory):
    """One node for the four wire values below: each is sent on an engine
    connection of its own, and the node must serve on after all of them."""
    node = Daemon(tmp_path_factory.mktemp("wire"), "node-a", "127.0.0.1")
    yield node
    node.stop()


@pytest.mark.parametrize("lease", [math.inf, 1.0, True, "1"])
def test_a_lease_that_is_no_int_is_a_clear_error(wire_node, lease):
    node = wire_node
    engine = NodeAttachment(node.socket, GEOMETRY)
    try:
        with pytest.raises(NodeError, match="lease must be the integer id"):
            engine.link.call("release", {"lease": lease})
        with pytest.raises(NodeError, match="ok must be true or false"):
            engine.link.call("commit", {"lease": 1, "ok": 1.5})
        assert engine.stats()["ready"]
        assert "Traceback" not in node.log()
    finally:
        engine.close()
