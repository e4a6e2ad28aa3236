"""The previous release, as the version-skew tests run it: its tree taken
from git at a fixed commit, and its nodes and engines run from that tree
with this checkout's virtual environment.

Why `git archive` into the test's directory rather than a worktree: it
leaves nothing in the repository to clean up (a test killed midway leaves
no registered worktree behind), and the files are the commit's own. Why
`python -P`: without it the interpreter puts the working directory (or a
script's directory) first on sys.path, ahead of PYTHONPATH, and the old
tree's `kvbm` would quietly be this checkout's.

PREVIOUS is main's last commit before versions were said: its hellos and
records carry none, which kvbm/versions.py reads as protocol 1. When the
wire changes next (PROTOCOL 3), this becomes main's last commit of
protocol 2.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

PREVIOUS = "4b137c89ad47b3ff2f6fd9a9525f73a5cdb07707"
PREVIOUS_PROTOCOL = 1
ROOT = pathlib.Path(__file__).resolve().parents[2]
PATHS = ("kvbm", "transport", "discovery", "tests")  # what runs: the product and its harness
OLD_PYTHON = (sys.executable, "-P")
NODE = (*OLD_PYTHON, "-m", "kvbm.cli", "node")
ENGINE_DRIVER = str(ROOT / "tests" / "harness" / "skew_engine.py")


def old_tree(directory: pathlib.Path) -> pathlib.Path:
    """PREVIOUS's tree under `directory`. Skips the test where the clone
    lacks the commit (a shallow one), and fails it under CI, which must run it."""
    have = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{PREVIOUS}^{{commit}}"],
        capture_output=True,
    )
    if have.returncode != 0:
        reason = f"this clone lacks commit {PREVIOUS} (the previous release): fetch full history"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    tree = directory / f"kvbm-{PREVIOUS[:7]}"
    tree.mkdir()
    archive = subprocess.Popen(
        ["git", "-C", str(ROOT), "archive", PREVIOUS, *PATHS], stdout=subprocess.PIPE
    )
    subprocess.run(["tar", "-x", "-C", str(tree)], stdin=archive.stdout, check=True)
    assert archive.wait() == 0
    return tree


def old_env(tree: pathlib.Path) -> dict[str, str]:
    """What a process of the old release adds to its environment."""
    return {"PYTHONPATH": str(tree)}


def old_engine(tree: pathlib.Path, order: dict, timeout: float = 120) -> dict:
    """One run of tests/harness/skew_engine.py under the old tree (see its
    docstring for `order` and the answer)."""
    out = subprocess.run(
        [*OLD_PYTHON, ENGINE_DRIVER, json.dumps(order)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tree,
        env={**os.environ, **old_env(tree)},
    )
    assert out.returncode == 0, out.stderr[-4000:]
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer["kvbm"].startswith(str(tree)), "the old engine ran this checkout's kvbm"
    return answer


def old_vllm_outputs(tree: pathlib.Path, model: str, prompts: list, socket: str) -> list:
    """A real vLLM engine whose connector is the old tree's, on the node at
    `socket`: its greedy outputs for `prompts` (the old tree's
    tests/harness/vllm_engine.py, started afresh: the fork server of
    tests/harness/engine_forks.py has this checkout's connector imported)."""
    out = subprocess.run(
        [*OLD_PYTHON, "-m", "tests.harness.vllm_engine", model, json.dumps(prompts), socket],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=tree,
        env={**os.environ, **old_env(tree), "TEST_MAX_TOKENS": "16"},
    )
    assert out.returncode == 0, out.stderr[-4000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith('{"outputs"')]
    assert lines, out.stdout[-2000:] + out.stderr[-2000:]
    return json.loads(lines[-1])["outputs"]
