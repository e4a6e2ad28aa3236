"""The host arena in another memory file system (`host_arena_dir`): a tmpfs
mounted `huge=always`, so the arena gets 2 MiB pages. Two `kvbm node`
processes keep their arenas there; an engine maps its node's arena from the
directory the node names; a prefix computed on one node reaches an engine on
the other over a peer READ, bit-exact. A directory that cannot hold an arena
is refused when the node starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvbm.connector.attach import Available, NodeAttachment
from kvbm.status import render
from tests.harness.node_daemon import loads_exactly, until
from tests.harness.root import need_root
from tests.harness.support import GEOMETRY, Engine


@pytest.fixture
def huge_tmpfs(tmp_path):
    need_root("mounts a tmpfs with huge pages")
    path = tmp_path / "huge"
    path.mkdir()
    opts = "huge=always,size=64m,mode=0700"
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "kvbm-huge", str(path)], check=True)
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_arenas_on_huge_pages_serve_engines_and_peers(etcd, daemons, huge_tmpfs):
    flags = ["--etcd", etcd.endpoint, "--host-cache-mb", "8", "--host-arena-dir", huge_tmpfs]
    a = daemons("node-a", "127.0.0.2", *flags)
    b = daemons("node-b", "127.0.0.3", *flags)
    eng_a = NodeAttachment(a.socket, GEOMETRY)
    eng_b = NodeAttachment(b.socket, GEOMETRY, remote=["host"])
    try:
        assert {e.arena.directory for e in (eng_a, eng_b)} == {huge_tmpfs}
        names = [n for e in (eng_a, eng_b) for n in (e.arena_name, f"{e.arena_name}.keys")]
        assert sorted(os.listdir(huge_tmpfs)) == sorted(names)  # each arena, its key view
        ks = eng_a.keys(list(range(7000, 7016)))
        made = Engine(16)
        assert eng_a.store(made.kv, ks, made.compute(ks)) == 16
        until(lambda: eng_b.lookup(ks) == Available(0, 16), 10, "B never saw A's blocks")
        assert loads_exactly(eng_b, ks, "remote_host")
        # the pages really are huge: in this engine process and in its node
        assert eng_a.arena.huge_page_bytes() >= 2 << 20
        assert eng_a.arena.huge_page_bytes(a.proc.pid) >= 2 << 20
        assert "huge_page_mb=0" not in a.log() and "huge_page_mb=" in a.log()
        # and `kvbm status` says so
        stats = eng_a.stats()
        assert stats["host_arena"]["dir"] == huge_tmpfs and stats["host_arena"]["huge_page_mb"] >= 2
        assert f"host arena in {huge_tmpfs}: 2 MiB pages" in render({**stats, "hit_shares": {}})
    finally:
        eng_a.close()
        eng_b.close()
    assert a.stop() == 0 and b.stop() == 0
    assert os.listdir(huge_tmpfs) == []  # each node removed its arena


def test_an_arena_directory_that_is_not_there_is_refused_at_start(tmp_path):
    node = [sys.executable, "-m", "kvbm.cli", "node", "--listen", "127.0.0.2:0"]
    out = subprocess.run(
        [*node, "--socket", str(tmp_path / "n.sock"), "--host-arena-dir", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert f"host_arena_dir {tmp_path / 'nope'} is not a writable directory" in out.stderr
