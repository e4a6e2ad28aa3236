"""A real second local user for the tests of what another user on the host
can do: uid 65534 ('nobody'), which a root test process becomes in a child.
Outside root these tests skip, saying why; under CI (where they run as root)
they fail instead, so a CI that lost root is seen."""

from __future__ import annotations

import subprocess
import sys

from tests.harness import root

NOBODY = 65534

AS_NOBODY = """
import os, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
os.umask(0)
exec(sys.argv[1])
"""


def need_root() -> None:
    """Skip or fail (tests/harness/root.py) unless root, who can become uid 65534."""
    root.need_root("acts as another local user (uid 65534)")


def as_nobody(code: str) -> None:
    """Run `code` (with `os` imported, umask 0) in a process of uid 65534."""
    out = subprocess.run(
        [sys.executable, "-c", AS_NOBODY, code], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
