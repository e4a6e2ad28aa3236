"""A `kvbm node` as a child process: the one way the demo, the benchmarks,
the private node of an engine and the tests start one. It runs until
SIGTERM (as Kubernetes stops a pod); the start returns once the node's
socket answers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence

from kvbm.engine_wire import node_listening
from kvbm.errors import KvbmError
from transport.secret import own_secret, without_secret

START_TIMEOUT_S = 60.0
NODE_COMMAND = (sys.executable, "-m", "kvbm.cli", "node")


def spawn_node(
    socket_path: str,
    flags: Sequence[str],
    log_path: str,
    command: Sequence[str] = NODE_COMMAND,
    preexec_fn: Callable[[], None] | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen:
    """Start a node serving `socket_path` and wait until it answers there.
    `command` runs a node another way (a test's unverified node, say);
    `env`: its environment (None: this process's); with a `--secret-file`
    in `flags`, without KVBM_SECRET (the file is the secret asked for)."""
    if "--secret-file" in flags:
        env = without_secret(env)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "ab") as log:
        proc = subprocess.Popen(
            [*command, "--socket", socket_path, *flags],
            stdout=log,
            stderr=log,
            preexec_fn=preexec_fn,
            env=env,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not node_listening(socket_path):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait(10)
            raise KvbmError(f"the kvbm node did not start; see {log_path}:\n{_tail(log_path)}")
        time.sleep(0.05)
    return proc


def fleet_secret(directory: str) -> list[str]:
    """The flags that give a fleet started here (the demo's, a benchmark's)
    one random secret of its own, kept 0600 in `directory`: a fleet never
    runs on a secret anyone else knows."""
    path = os.path.join(directory, "fleet.secret")
    own_secret(path)
    return ["--secret-file", path]


def _tail(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-4000:]


class NodeProcess:
    """A named node on a loopback address, with its socket and log in `directory`."""

    def __init__(
        self,
        directory: str,
        name: str,
        host: str,
        *flags: str,
        command: Sequence[str] = NODE_COMMAND,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.socket = os.path.join(directory, f"{name}.sock")
        self.log_path = os.path.join(directory, f"{name}.log")
        node_flags = ["--node-id", name, "--listen", f"{host}:0", *flags]
        self.proc = spawn_node(self.socket, node_flags, self.log_path, command, env=env)

    def listening(self) -> bool:
        return node_listening(self.socket)

    def log(self) -> str:
        return _tail(self.log_path)

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it has not exited within 30 s; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)
