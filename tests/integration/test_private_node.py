"""The connector's private node (no `node` in its extra config): the first
engine process starts one, the next ones share it, and it goes when its
starter does."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from kvbm.config import load_config
from kvbm.connector import private_node
from kvbm.connector.attach import Available, NodeAttachment
from tests.harness.support import GEOMETRY, Engine


@pytest.fixture
def private_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(private_node.tempfile, "gettempdir", lambda: str(tmp_path))
    return tmp_path


def test_a_private_node_is_started_once_and_shared(private_dir):
    cfg = load_config(env={}, overrides={"host_cache_mb": 2})
    path, proc = private_node.ensure_private_node(cfg)
    try:
        assert proc is not None and path.startswith(str(private_dir))
        again, second = private_node.ensure_private_node(cfg)
        assert (again, second) == (path, None)  # already running: shared, not started twice
        one = NodeAttachment(path, GEOMETRY)
        two = NodeAttachment(again, GEOMETRY)
        try:
            ks = one.keys(list(range(4)))
            made = Engine(4)
            assert one.store(made.kv, ks, made.compute(ks)) == 4
            assert two.lookup(ks) == Available(4)
            assert one.num_slots == (2 << 20) // GEOMETRY.slot_bytes  # the merged config
        finally:
            one.close()
            two.close()
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    assert not os.path.exists(path)


def test_the_private_node_dies_with_the_process_that_started_it(private_dir):
    # a short-lived starter: its node must not outlive it
    code = (
        "from kvbm.config import load_config; from kvbm.connector import private_node as p;"
        f"p.tempfile.gettempdir = lambda: {str(private_dir)!r};"
        "path, proc = p.ensure_private_node(load_config(env={}, overrides={'host_cache_mb': 2}));"
        "print(proc.pid, flush=True)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[-1])
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    raise AssertionError("the private node outlived its starter")
