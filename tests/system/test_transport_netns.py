"""Two nodes as on two machines: each in its own network, PID and IPC
namespaces, joined by a veth pair, so NIXL's UCX must carry the blocks over
TCP (the veth's byte counters prove they crossed it). The test creates the
namespaces and removes them (CI runs as root)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.harness.root import need_root
from tests.harness.support import GEOMETRY

N = 32
ADDR_A, ADDR_B = "10.213.7.1", "10.213.7.2"  # inside the test's own namespaces only


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def netns_pair():
    """Namespaces A and B, veth ends `va` in A and `vb` in B, addresses set."""
    need_root("creates network namespaces")
    tag = f"kvbm{os.getpid() % 100000}"
    ns_a, ns_b = f"{tag}a", f"{tag}b"
    created = []
    try:
        for ns in (ns_a, ns_b):
            sh("ip", "netns", "add", ns)
            created.append(ns)
        sh("ip", "link", "add", f"{tag}va", "type", "veth", "peer", "name", f"{tag}vb")
        for ns, end, addr in ((ns_a, f"{tag}va", ADDR_A), (ns_b, f"{tag}vb", ADDR_B)):
            sh("ip", "link", "set", end, "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", end)
            sh("ip", "-n", ns, "link", "set", end, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield ns_a, ns_b, f"{tag}vb"
    finally:
        for ns in created:  # removing a namespace removes its veth end, and the pair
            subprocess.run(["ip", "netns", "del", ns], check=False)


def rx_bytes(ns: str, dev: str) -> int:
    stats = json.loads(sh("ip", "-n", ns, "-s", "-j", "link", "show", dev))
    return int(stats[0]["stats64"]["rx"]["bytes"])


def test_pull_between_two_network_namespaces(netns_pair, tmp_path):
    ns_a, ns_b, dev_b = netns_pair
    # Own network, PID and IPC namespaces per node, as on two machines: UCX
    # finds no shared-memory path (CMA needs one PID namespace) and uses TCP.
    alone = ["unshare", "--pid", "--ipc", "--fork", "--kill-child", sys.executable, "-m"]
    in_a = ["ip", "netns", "exec", ns_a, *alone]
    in_b = ["ip", "netns", "exec", ns_b, *alone]
    peer = subprocess.Popen(
        [*in_a, "tests.harness.transport_node", ADDR_A, str(tmp_path / "peer"), str(N)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port, on_disk, in_host = (int(x) for x in peer.stdout.readline().split())
        assert on_disk > 0 and in_host > 0, "the peer should hold blocks in both tiers"
        before = rx_bytes(ns_b, dev_b)
        puller = subprocess.run(
            [*in_b, "tests.harness.transport_puller", ADDR_B, ADDR_A, str(port), str(N)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert puller.returncode == 0, puller.stderr[-3000:]
        result = json.loads(puller.stdout.strip().splitlines()[-1])
        assert result == {"arrived": N, "loaded": N, "exact": N}
        # the blocks crossed the veth pair: nothing else joins the namespaces
        assert rx_bytes(ns_b, dev_b) - before >= N * GEOMETRY.block_bytes
    finally:
        if peer.poll() is None:
            peer.stdin.close()
            try:
                peer.wait(20)
            except subprocess.TimeoutExpired:
                peer.kill()
                peer.wait(10)
