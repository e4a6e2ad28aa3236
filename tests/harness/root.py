"""Tests that need root (to mount a small file system, make network
namespaces, act as another user) say why and skip for a developer who is
not root; under CI (CI=true, where they run as root) they fail instead, so a
CI that lost root is seen rather than passing with the guard skipped."""

from __future__ import annotations

import os

import pytest


def need_root(why: str) -> None:
    """Skip this test, or fail it under CI, unless the process is root;
    `why` says what the test does that only root may."""
    if os.geteuid() == 0:
        return
    reason = f"{why}: run it as root"
    if os.environ.get("CI"):
        pytest.fail(reason + " (CI does)")
    pytest.skip(reason)
