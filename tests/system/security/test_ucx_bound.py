"""Issue 14, finding 2 (in part): UCX, under NIXL, listened on every
interface of the machine even for a node on 127.0.0.2. A real `kvbm node`
now keeps UCX on the interface of its listen address: every socket it and
its NIXL agent process listen on is a loopback one, while a pull between two such nodes still
works bit-exact."""

from __future__ import annotations

import ipaddress
import re
import subprocess

from tests.harness.node_daemon import loads_exactly
from tests.harness.peer_attacks import agent_pid, two_nodes


def listening(pid: int) -> list[str]:
    """Addresses the process listens on (TCP), as `ss` shows them."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]


def test_a_node_on_loopback_listens_on_loopback_only(etcd, daemons, tmp_path):
    with two_nodes(etcd, daemons, tmp_path, 8) as n:
        assert loads_exactly(n.eng_b, n.keys, "remote_host")  # NIXL still carries the pull
        for node in (n.a, n.b):
            # the peer RPC, and UCX's own in the node's NIXL agent processes
            confined = [agent_pid(node.proc.pid, role) for role in ("serve", "pull")]
            assert None not in confined
            addresses = listening(node.proc.pid) + [a for p in confined for a in listening(p)]
            assert len(addresses) >= 3, addresses
            for address in addresses:
                host = re.sub(r"^\[|\]?:\d+$", "", address)
                assert ipaddress.ip_address(host).is_loopback, (node.name, addresses)
