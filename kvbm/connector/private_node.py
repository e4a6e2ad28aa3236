"""A node for one machine with no set-up: started by the first engine process
that needs it when the connector names no node, shared by the others on the
machine, and gone with the process that started it.

It runs `kvbm node` on the merged configuration (written to a file beside
its socket) with the in-memory index: local tiers only, no peer port, and a
secret of its own that it makes and keeps in its private directory.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import subprocess
import tempfile

from kvbm.config import KvbmConfig
from kvbm.config_text import to_toml
from kvbm.engine_wire import node_listening
from kvbm.node_process import spawn_node
from kvbm.owned_dir import own_directory

_PR_SET_PDEATHSIG = 1


def private_socket() -> str:
    return os.path.join(tempfile.gettempdir(), f"kvbm-private-{os.getuid()}", "node.sock")


def ensure_private_node(cfg: KvbmConfig) -> tuple[str, subprocess.Popen | None]:
    """The private node's socket path, and the process if this call started it."""
    path = private_socket()
    directory = os.path.dirname(path)
    own_directory(directory)  # in a shared /tmp: ours, or refused
    with os.fdopen(_open_own(os.path.join(directory, "start.lock")), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter at a time
        if node_listening(path):
            return path, None
        config = os.path.join(directory, "node.toml")
        with os.fdopen(_open_own(config, os.O_TRUNC), "w") as f:
            f.write(to_toml(cfg))
        flags = ["--config", config, "--etcd", ""]  # no fleet: no peer port, its own secret
        log_path = os.path.join(directory, "node.log")
        proc = spawn_node(path, flags, log_path, preexec_fn=_die_with_parent)
        return path, proc


def _open_own(path: str, flags: int = 0) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | flags, 0o600)


def _die_with_parent() -> None:
    """SIGTERM to the child when the thread that started it ends (an engine
    creates its connector on its main thread)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
