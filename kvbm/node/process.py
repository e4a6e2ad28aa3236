"""A `kvbm node` as a child process, for the demo, the benchmarks and the
tests: started on a loopback address with its own socket and log file, and
stopped with SIGTERM (as Kubernetes stops a pod)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from kvbm.errors import KvbmError
from kvbm.node.engine_rpc import node_listening

START_TIMEOUT_S = 60.0


class NodeProcess:
    def __init__(self, directory: str, name: str, host: str, *flags: str) -> None:
        self.name = name
        self.socket = os.path.join(directory, f"{name}.sock")
        self.log_path = os.path.join(directory, f"{name}.log")
        cmd = [sys.executable, "-m", "kvbm.cli", "node", "--node-id", name]
        cmd += ["--listen", f"{host}:0", "--socket", self.socket, *flags]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.listening():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait(10)
                raise KvbmError(f"node {name} did not start:\n{self.log()}")
            time.sleep(0.05)

    def listening(self) -> bool:
        return node_listening(self.socket)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it has not exited within 30 s; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)
