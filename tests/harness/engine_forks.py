"""vLLM engine processes forked from a server that has imported vLLM once.

Why: a vLLM engine process spends most of its start importing (about 10 s
of 13 here, against 3.5 s for the same engine forked from a process that has
imported vLLM and the modules its engine loads), and the system tests start
about 25 engines. A forked engine is still a process of its own: its pid,
memory, descriptors, environment and working directory are the test's, it
exits with its own status, and a signal reaches it alone. What it shares
with the server is the code of the modules imported before the fork, as a
fresh interpreter would have loaded them. The server imports nothing that
starts a thread, opens a device or reads a test's settings: vLLM reads its
environment when an engine is built, after the fork. vLLM's own engine-core
process (its default on CPU is `spawn`) starts from a fresh interpreter, as
it does without the server.

The server is single-threaded (a fork copies only the thread that calls it)
and serves one connection per engine: the client sends one JSON line
{"module", "argv", "env", "cwd"} with its stdin, stdout and stderr
descriptors attached (SCM_RIGHTS); the server forks, answers {"pid": N}, and
{"exit": code} once the engine has exited. The engine runs `module` as
`python -m module` would, then exits as an interpreter does (atexit, thread
joins), so vLLM shuts its engine-core process down as without the server.
Run as `python -m tests.harness.engine_forks SOCKET`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass

# What an engine imports on its way to its first token: the server imports it
# once (an import that fails is skipped: the engines then import it themselves).
WARM = (
    "vllm.entrypoints.llm",
    "vllm.v1.engine.llm_engine",
    "vllm.v1.engine.core",
    "vllm.v1.executor.uniproc_executor",
    "vllm.v1.worker.cpu_worker",
    "vllm.v1.attention.backends.cpu_attn",
    "vllm.model_executor.model_loader",
    "vllm.model_executor.models.llama",
    "vllm.model_executor.models.blip2",
    "vllm.lora.request",
    "vllm.inputs",
    "kvbm.connector.vllm",
)
READY = "ready"


def serve(path: str) -> dict | None:
    """Forks an engine per connection until SIGTERM; returns in a forked
    child only, with the engine's order (its descriptors already in place)."""
    from tests.harness.vllm_engine import prepare_environment

    prepare_environment()  # as an engine sets it before it imports vLLM
    for name in WARM:
        try:
            importlib.import_module(name)
        except ImportError as e:
            print(f"engine_forks: not preloaded: {name}: {e}", file=sys.stderr)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    children: dict[int, socket.socket] = {}
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    print(READY, flush=True)
    while not stopping:
        with contextlib.suppress(InterruptedError):
            ready, _, _ = select.select([listener], [], [], 0.1)
            if ready:
                conn, _ = listener.accept()
                order, fds = _receive(conn)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    for other in children.values():
                        other.close()
                    conn.close()
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    for target, fd in enumerate(fds):
                        os.dup2(fd, target)
                        os.close(fd)
                    return order
                for fd in fds:
                    os.close(fd)
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
                children[pid] = conn
        _reap(children)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    while children:
        _reap(children, block=True)
    listener.close()
    return None


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    while not data.endswith(b"\n"):
        more = conn.recv(1 << 16)
        if not more:
            raise ConnectionError("the client left before its order was whole")
        data += more
    return json.loads(data), list(fds)


def _reap(children: dict[int, socket.socket], block: bool = False) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps({"exit": os.waitstatus_to_exitcode(status)}).encode())
            conn.close()
        if block:
            return


def run_order(order: dict) -> int:
    """In the forked child: `python -m module argv...` in the client's
    directory and environment; the exit status."""
    import runpy

    os.chdir(order["cwd"])
    os.environ.clear()
    os.environ.update(order["env"])
    sys.argv = [order["module"], *order["argv"]]
    try:
        runpy.run_module(order["module"], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # reported as the interpreter would
        traceback.print_exc()
        return 1
    return 0


@dataclass
class ForkedProcess:
    """A forked engine, as much of `subprocess.Popen` as the tests use."""

    pid: int
    conn: socket.socket
    received: bytes = b""  # of the exit line, so far
    returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.conn.settimeout(timeout)
            try:
                while more := self.conn.recv(1 << 10):
                    self.received += more
            except TimeoutError:
                raise subprocess.TimeoutExpired(f"engine {self.pid}", timeout or 0) from None
            self.conn.close()
            # nothing said: the server died first, and the engine's status is lost
            said = json.loads(self.received) if self.received else {"exit": -signal.SIGKILL}
            self.returncode = int(said["exit"])
        return self.returncode

    def poll(self) -> int | None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.wait(0.001)
        return None

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class EngineForks:
    """The fork server, started by a test session and stopped with it."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="kvbm-engine-forks-")
        self.path = os.path.join(self.directory, "forks.sock")
        self.server = subprocess.Popen(
            [sys.executable, "-m", "tests.harness.engine_forks", self.path],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.server.stdout.readline().strip()  # type: ignore[union-attr]
        if line != READY:
            self.close()
            raise RuntimeError(f"the engine fork server did not start: {line!r}")

    def start(
        self,
        module: str,
        argv: list[str],
        env: dict[str, str],
        stdin: int,
        stdout: int,
        stderr: int,
    ) -> ForkedProcess:
        """`python -m module argv...` with these descriptors, forked."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.path)
        order = {"module": module, "argv": argv, "env": env, "cwd": os.getcwd()}
        socket.send_fds(conn, [json.dumps(order).encode() + b"\n"], [stdin, stdout, stderr])
        data = b""
        while b"\n" not in data:
            more = conn.recv(1 << 10)
            if not more:
                raise RuntimeError("the engine fork server closed the connection")
            data += more
        line, rest = data.split(b"\n", 1)
        return ForkedProcess(int(json.loads(line)["pid"]), conn, rest)

    def run(
        self, module: str, argv: list[str], env: dict[str, str], timeout: float
    ) -> subprocess.CompletedProcess:
        """As `subprocess.run(capture_output=True, text=True, timeout=...)`."""
        with (
            open(os.devnull) as stdin,
            tempfile.TemporaryFile("w+") as out,
            tempfile.TemporaryFile("w+") as err,
        ):
            proc = self.start(module, argv, env, stdin.fileno(), out.fileno(), err.fileno())
            try:
                code = proc.wait(timeout)
            finally:
                proc.kill()
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(argv, code, out.read(), err.read())

    def close(self) -> None:
        if self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait(10)
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(self.directory)


if __name__ == "__main__":
    child_order = serve(sys.argv[1])
    if child_order is not None:
        sys.exit(run_order(child_order))
