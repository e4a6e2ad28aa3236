"""Issue 14, finding 2 (in part): UCX, under NIXL, listened on every
interface of the machine even for a node on 127.0.0.2. A real `kvbm node`
now keeps UCX on the interface of its listen address: every socket it
listens on is a loopback one, while a pull between two such nodes still
works bit-exact."""

from __future__ import annotations

import ipaddress
import re
import subprocess

from kvbm.connector.attach import Available, NodeAttachment
from tests.node_daemon import loads_exactly, until
from tests.security.peer_attacks import write_secret
from tests.support import GEOMETRY, Engine


def listening(pid: int) -> list[str]:
    """Addresses the process listens on (TCP), as `ss` shows them."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]


def test_a_node_on_loopback_listens_on_loopback_only(etcd, daemons, tmp_path):
    secret = write_secret(tmp_path / "secret")
    common = ["--etcd", etcd.endpoint, "--secret-file", secret]
    a = daemons("node-a", "127.0.0.2", *common)
    b = daemons("node-b", "127.0.0.3", *common)
    eng_a = NodeAttachment(a.socket, GEOMETRY)
    eng_b = NodeAttachment(b.socket, GEOMETRY, remote=["host"])
    try:
        ks = eng_a.keys(list(range(8)))
        made = Engine(8)
        assert eng_a.store(made.kv, ks, made.compute(ks)) == 8
        until(lambda: eng_b.lookup(ks) == Available(0, 8), 10, "B never saw A's blocks")
        assert loads_exactly(eng_b, ks, "remote_host")  # NIXL still carries the pull
        for node in (a, b):
            addresses = listening(node.proc.pid)
            assert len(addresses) >= 2, addresses  # the peer RPC, and UCX's own
            for address in addresses:
                host = re.sub(r"^\[|\]?:\d+$", "", address)
                assert ipaddress.ip_address(host).is_loopback, (node.name, addresses)
    finally:
        eng_a.close()
        eng_b.close()
