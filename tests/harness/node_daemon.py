"""A `kvbm node` daemon as a test starts it (a real process on a loopback
address), and small waiting helpers shared by the node and connector tests."""

from __future__ import annotations

import itertools
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from kvbm.block_key import BlockKey
from kvbm.connector.attach import NodeAttachment
from kvbm.node_process import NODE_COMMAND, NodeProcess
from tests.harness.support import Engine
from transport.secret import without_secret

TEST_FLEET_SECRET = "kvbm-test-fleet-" + secrets.token_hex(16)  # one per test session


class Daemon(NodeProcess):
    """A `kvbm node` logging at info level into the test's directory. A node
    on etcd without a `--secret-file` gets the test session's fleet secret
    (KVBM_SECRET), as an operator would set one; any other node runs without
    one: on its own it makes its own. `command` runs the node another way (a
    harness script), `env` adds to its environment (another release's tree
    on PYTHONPATH: tests/harness/old_tree.py)."""

    def __init__(
        self,
        tmp_path,
        name: str,
        host: str,
        *flags: str,
        command: Sequence[str] = NODE_COMMAND,
        env: dict[str, str] | None = None,
    ) -> None:
        full = {**fleet_env(flags), **(env or {})}
        flags = ("--log-level", "info", *flags)
        super().__init__(str(tmp_path), name, host, *flags, command=command, env=full)


def fleet_env(flags: Sequence[str]) -> dict[str, str]:
    """The environment of a test's node started with `flags`."""
    env = without_secret()
    on_etcd = any(f == "--etcd" and v for f, v in itertools.pairwise(flags))
    if on_etcd and "--secret-file" not in flags:
        env["KVBM_SECRET"] = TEST_FLEET_SECRET
    return env


def kvbm_json(*args: str) -> dict:
    """`kvbm ARGS --json`; with a `--secret-file`, without the session's KVBM_SECRET."""
    env = without_secret() if "--secret-file" in args else None
    out = subprocess.run(
        [sys.executable, "-m", "kvbm.cli", *args, "--json"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.05)


def spill(eng: NodeAttachment, ks: list) -> None:
    """Store `ks`, then enough others that they move to the disk tier."""
    made = Engine(len(ks))
    assert eng.store(made.kv, ks, made.compute(ks)) == len(ks)
    filler = eng.keys(list(range(50_000, 50_000 + eng.num_slots + 8)))
    big = Engine(len(filler))
    eng.store(big.kv, filler, big.compute(filler))


def loads_exactly(engine: NodeAttachment, keys: list[BlockKey], source: str) -> bool:
    """Whether `engine` loads all of `keys`, every one from `source`, bit-exact."""
    got = Engine(len(keys))
    loaded, sources = engine.load(got.kv, keys, list(range(len(keys))))
    exact = all(got.holds(k, i) for i, k in enumerate(keys))
    return loaded == len(keys) and sources.get(source) == len(keys) and exact
