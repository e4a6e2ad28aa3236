"""A `kvbm node` daemon as a test starts it (a real process on a loopback
address), and small waiting helpers shared by the node and connector tests."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable


class Daemon:
    """One `kvbm node` process; its log goes to a file shown when a test fails."""

    def __init__(self, tmp_path, name: str, host: str, *flags: str) -> None:
        self.name = name
        self.socket = str(tmp_path / f"{name}.sock")
        self.log_path = tmp_path / f"{name}.log"
        cmd = [sys.executable, "-m", "kvbm.cli", "node", "--node-id", name]
        cmd += ["--listen", f"{host}:0", "--socket", self.socket, "--log-level", "info", *flags]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        until(self._listening, 60, f"node {name} never opened its socket")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"node {self.name} exited:\n{self.log()}")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(self.socket)
                return True
            except OSError:
                return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)


def kvbm_json(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "kvbm.cli", *args, "--json"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.05)
