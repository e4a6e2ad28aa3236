"""Issue 14, findings 9 (the secret and the frames' freshness), against real
`kvbm node` processes: a secret file others may read is refused at start,
KVBM_SECRET is taken as the secret it is (not warned about as a stray
setting), and a frame whose timestamp is NaN is not fresh."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys

from tests.harness.node_daemon import fleet_env
from tests.harness.peer_attacks import SECRET, answer, hello, serving, write_secret


def node_start(tmp_path, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`kvbm node` on 127.0.0.2 (not loopback-only: a secret is required); a
    node that starts is stopped at the timeout."""
    cmd = [sys.executable, "-m", "kvbm.cli", "node", "--listen", "127.0.0.2:0"]
    cmd += ["--socket", str(tmp_path / "n.sock"), *flags]
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=15, env={**fleet_env(flags), **(env or {})}
        )
    except subprocess.TimeoutExpired as e:  # run() has killed it
        return subprocess.CompletedProcess(cmd, -9, e.stdout or "", str(e.stderr or ""))


def test_a_secret_file_its_group_or_others_may_read_is_refused(tmp_path):
    for mode in (0o640, 0o604, 0o644):
        path = write_secret(tmp_path / f"secret-{mode:o}", mode)
        out = node_start(tmp_path, "--secret-file", path)
        assert out.returncode == 2, (mode, out.stderr[-2000:])
        assert "open to its group or to others" in out.stderr


def test_the_secret_in_the_environment_is_no_stray_setting(tmp_path):
    env = {**os.environ, "KVBM_SECRET": SECRET.decode()}
    out = subprocess.run(
        [sys.executable, "-m", "kvbm.cli", "config"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    assert "KVBM_SECRET" not in out.stderr  # no "ignoring unknown environment variable"
    # control: a real stray variable is still named
    env["KVBM_NO_SUCH_SETTING"] = "1"
    out = subprocess.run(
        [sys.executable, "-m", "kvbm.cli", "config"], capture_output=True, text=True, env=env
    )
    assert "KVBM_NO_SUCH_SETTING" in out.stderr


def test_a_frame_stamped_nan_is_not_fresh(etcd, daemons, tmp_path):
    secret = write_secret(tmp_path / "s")
    node = daemons("node-a", "127.0.0.2", "--etcd", etcd.endpoint, "--secret-file", secret)
    host, port, engine = serving(node)
    try:
        # control: the same hello, stamped now, is answered (with the node's challenge)
        assert len(asyncio.run(answer(host, port, hello()))) > 4
        # stamped NaN: the node hangs up without a word
        assert asyncio.run(answer(host, port, hello(ts=math.nan))) == b""
        assert "stale or future timestamp" in node.log()
        assert engine.stats()["ready"]
    finally:
        engine.close()
